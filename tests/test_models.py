"""The data model on both databases: polymorphic loading, no lazy loads, soft delete, task versions,
UTC times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import joinedload
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server.db import INCLUDE_DELETED, Database
from mcp_server.models import AuditAction, AuditEntry, Entity, Priority, Project, Task, TaskStatus, utcnow
from mcp_server.schemas import iso_time
from mcp_server.sql import iso_text

pytestmark = pytest.mark.anyio


async def add_project_with_a_task(db: Database) -> tuple[int, int]:
    async with db.session(write=True) as session:
        project = Project(title="Apollo")
        session.add(project)
        await session.flush()
        task = Task(title="t", status=TaskStatus.PENDING, priority=Priority.LOW, project_id=project.id)
        session.add(task)
        session.add(AuditEntry(entity=task, action=AuditAction.CREATED, changed_by="me", request_id="r"))
        await session.flush()
    assert project.id is not None and task.id is not None
    return project.id, task.id


async def test_projects_and_tasks_in_one_table_load_as_their_own_classes(db: Database) -> None:
    await add_project_with_a_task(db)
    async with db.session(write=False) as session:
        loaded = (await session.exec(select(Entity).order_by(col(Entity.id)))).all()
        tasks_only = (await session.exec(select(Task).options(joinedload(Task.project)))).all()
        entry = (await session.exec(select(AuditEntry).options(joinedload(AuditEntry.entity)))).one()  # type: ignore[arg-type]
    assert [type(e) for e in loaded] == [Project, Task]
    assert type(tasks_only[0].project) is Project
    assert [e.kind for e in loaded] == ["project", "task"]
    assert [t.title for t in tasks_only] == ["t"]
    assert type(entry.entity) is Task  # the audit entry's entity, as its own class


async def test_a_task_id_is_no_project_and_a_project_id_no_task(db: Database) -> None:
    project_id, task_id = await add_project_with_a_task(db)
    async with db.session(write=False) as session:
        assert await session.get(Task, project_id) is None
        assert await session.get(Project, task_id) is None
        assert type(await session.get(Entity, task_id)) is Task


async def test_a_relationship_that_was_not_eager_loaded_raises_instead_of_lazy_loading(db: Database) -> None:
    await add_project_with_a_task(db)
    async with db.session(write=False) as session:
        task = (await session.exec(select(Task))).one()
        with pytest.raises(InvalidRequestError, match="lazy"):
            _ = task.project
        entry = (await session.exec(select(AuditEntry))).one()
        with pytest.raises(InvalidRequestError, match="lazy"):
            _ = entry.entity


async def test_soft_deleted_tasks_and_projects_are_left_out_of_every_read_unless_asked_for(
    db: Database,
) -> None:
    project_id, task_id = await add_project_with_a_task(db)
    async with db.session(write=True) as session:
        for entity in (await session.exec(select(Entity))).all():
            entity.deleted_at = utcnow()
    async with db.session(write=False) as session:
        assert (await session.exec(select(Task))).all() == []
        assert (await session.exec(select(Project.id))).all() == []
        assert await session.get(Task, task_id) is None
        assert await session.get(Project, project_id) is None
        with_deleted = await session.exec(
            select(Task).options(joinedload(Task.project)), execution_options=INCLUDE_DELETED
        )
        [task] = with_deleted.all()
        # What a row points at is loaded whether deleted or not: here the task's deleted project.
        assert task.project.title == "Apollo"
        entry = (await session.exec(select(AuditEntry).options(joinedload(AuditEntry.entity)))).one()  # type: ignore[arg-type]
        assert entry.entity is task


async def test_a_change_flushed_over_a_newer_version_of_the_task_is_refused_not_lost(db: Database) -> None:
    _, task_id = await add_project_with_a_task(db)
    stale = AsyncSession(db.engine, expire_on_commit=False)
    try:
        async with stale.begin():
            task = await stale.get(Task, task_id)
        assert task is not None and task.version == 1
        async with db.session(write=True) as session:
            fresh = await session.get(Task, task_id)
            assert fresh is not None
            fresh.status = TaskStatus.BLOCKED
        with pytest.raises(StaleDataError):
            async with stale.begin():
                task.status = TaskStatus.COMPLETED
                await stale.flush()
    finally:
        await stale.close()
    async with db.session(write=False) as session:
        kept = await session.get(Task, task_id)
    assert kept is not None and (kept.status, kept.version) == (TaskStatus.BLOCKED, 2)


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


async def test_the_database_writes_a_time_as_text_exactly_as_the_tools_format_it(db: Database) -> None:
    tokyo = timezone(timedelta(hours=9))
    times = [
        datetime(2026, 3, 1, 9, 30, tzinfo=tokyo),  # no fraction of a second
        datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1999, 1, 2, 3, 4, 5, 60, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
    ]
    async with db.session(write=True) as session:
        for n, written in enumerate(times):
            session.add(Project(title=f"p{n}", created_at=written, updated_at=written))
    as_text = select(iso_text(Project.created_at), Project.created_at).order_by(col(Project.title))
    async with db.session(write=False) as session:
        rows = (await session.exec(as_text)).all()
    expected = [iso_time(t) for t in times]
    assert [text for text, _ in rows] == [iso_time(loaded) for _, loaded in rows] == expected
    assert rows[0][0] == "2026-03-01T00:30:00.000000Z"


async def test_a_naive_datetime_is_refused(db: Database) -> None:
    with pytest.raises(Exception, match="naive datetime"):
        async with db.session(write=True) as session:
            session.add(Project(title="x", created_at=datetime(2026, 1, 1), updated_at=datetime(2026, 1, 1)))
