"""The data model on both databases: polymorphic loading, no lazy loads, UTC times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import joinedload
from sqlmodel import select

from mcp_server.db import Database
from mcp_server.models import Entity, Priority, Project, Task, TaskStatus

pytestmark = pytest.mark.anyio


async def add_project_with_a_task(db: Database) -> None:
    async with db.session(write=True) as session:
        project = Project(title="Apollo")
        session.add(project)
        await session.flush()
        session.add(Task(title="t", status=TaskStatus.PENDING, priority=Priority.LOW, project_id=project.id))


async def test_projects_and_tasks_in_one_table_load_as_their_own_classes(db: Database) -> None:
    await add_project_with_a_task(db)
    async with db.session(write=False) as session:
        loaded = (await session.exec(select(Entity).order_by(Entity.id))).all()  # type: ignore[arg-type]
        tasks_only = (await session.exec(select(Task).options(joinedload(Task.project)))).all()
    assert [type(e) for e in loaded] == [Project, Task]
    assert type(tasks_only[0].project) is Project
    assert [e.kind for e in loaded] == ["project", "task"]
    assert [t.title for t in tasks_only] == ["t"]


async def test_a_relationship_that_was_not_eager_loaded_raises_instead_of_lazy_loading(db: Database) -> None:
    await add_project_with_a_task(db)
    async with db.session(write=False) as session:
        task = (await session.exec(select(Task))).one()
        with pytest.raises(InvalidRequestError, match="lazy"):
            _ = task.project


async def test_times_are_stored_and_read_back_as_timezone_aware_utc(db: Database) -> None:
    tokyo = timezone(timedelta(hours=9))
    written = datetime(2026, 3, 1, 9, 30, tzinfo=tokyo)
    async with db.session(write=True) as session:
        project = Project(title="Apollo", created_at=written, updated_at=written)
        session.add(project)
    async with db.session(write=False) as session:
        loaded = (await session.exec(select(Project))).one()
    assert loaded.created_at == written and loaded.created_at.tzinfo == UTC
    assert loaded.created_at.hour == 0


async def test_a_naive_datetime_is_refused(db: Database) -> None:
    with pytest.raises(Exception, match="naive datetime"):
        async with db.session(write=True) as session:
            session.add(Project(title="x", created_at=datetime(2026, 1, 1), updated_at=datetime(2026, 1, 1)))
