"""Several agents writing at once, each call sent twice with one idempotency key: every change lands
exactly once, with exactly its audit entries."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import anyio
import pytest
from mcp import Client
from sqlalchemy import text, update
from sqlalchemy.exc import DBAPIError
from sqlmodel import col, func, select

from mcp_server import chain, titles
from mcp_server.checkpoints import CheckpointKeys
from mcp_server.config import Settings
from mcp_server.db import INCLUDE_DELETED, Database, create_database
from mcp_server.errors import DATABASE_ERRORS
from mcp_server.models import AuditEntry, AuditSeal, Task
from mcp_server.schemas import iso_time
from tests.conftest import as_outsider, call, connect, seal_all
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio


async def test_concurrent_writers_leave_an_unbroken_audit_chain_for_every_task(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era, name="setup") as setup:
        project_id = await make_project(setup)
        seeded = [(await make_task(setup, project_id, f"seed {i}"))["id"] for i in range(10)]

    everything = {"field": "id", "op": "in", "value": seeded}

    async def twice(client: Client, tool: str, arguments: dict[str, Any], key: str) -> Any:
        """The call and its retry sent at the same moment, as an agent does when a reply is slow."""
        results: list[Any] = []

        async def send() -> None:
            results.append(await call(client, tool, {**arguments, "idempotency_key": key}))

        async with anyio.create_task_group() as both:
            both.start_soon(send)
            both.start_soon(send)
        assert results[0] == results[1], f"{tool}: a retry got a different result"
        return results[0]

    async def agent(name: str) -> None:
        async with connect(settings, era, name=name) as client:
            for i in range(5):
                key = f"{name}-{i}"
                own = await twice(
                    client, "create_task", {"title": f"{name} {i}", "project_id": project_id}, f"{key}-create"
                )
                await twice(
                    client,
                    "update_task",
                    {"task_id": seeded[i], "title": f"{name} {i}", "priority": "high"},
                    f"{key}-update",
                )
                await twice(
                    client, "bulk_update_status", {"status": "blocked", "filter": everything}, f"{key}-b1"
                )
                await twice(client, "soft_delete_task", {"task_id": own["id"]}, f"{key}-delete")
                if i % 2:
                    await twice(client, "restore_task", {"task_id": own["id"]}, f"{key}-restore")
                await twice(
                    client, "bulk_update_status", {"status": "pending", "filter": everything}, f"{key}-b2"
                )

    async with anyio.create_task_group() as group:
        for n in range(4):
            group.start_soon(agent, f"agent-{n}")

    await seal_all(settings, db)
    async with db.session(write=False) as session:
        every_task = await session.exec(select(Task), execution_options=INCLUDE_DELETED)
        tasks = {t.id: t for t in every_task.all()}
        in_chain = select(AuditEntry, AuditSeal).join(
            AuditSeal, col(AuditSeal.entry_id) == col(AuditEntry.id)
        )
        sealed = (await session.exec(in_chain.order_by(col(AuditSeal.seq)))).all()
        written = (await session.exec(select(func.count()).select_from(AuditEntry))).one()
    async with db.session(write=False) as session:
        report = await chain.verify(session, CheckpointKeys([]))
    assert len(tasks) == 10 + 4 * 5
    # One linear hash chain holding every entry: positions 1..n with no gap or fork, every link intact.
    assert [seal.seq for _, seal in sealed] == list(range(1, written + 1))
    assert report["ok"] and report["entries_checked"] == written and report["unsealed"] == 0
    entries = [entry for entry, _ in sealed]
    chains: dict[int | None, list[AuditEntry]] = defaultdict(list)
    for entry in entries:
        chains[entry.entity_id].append(entry)
    for task_id, task in tasks.items():
        history = chains[task_id]
        assert history[0].action == "created" and [e.action for e in history].count("created") == 1
        state: dict[str, Any] = {**history[0].new_value, "deleted_at": None}  # type: ignore[dict-item]
        for entry in history[1:]:
            assert entry.old_value is not None and entry.new_value is not None
            for key, old in entry.old_value.items():
                assert state[key] == old, f"task {task_id}: entry {entry.id} recorded a stale {key}"
            state |= entry.new_value
        current = {
            "title": task.title,
            "description": task.description,
            "status": task.status,
            "priority": task.priority,
            "project_id": task.project_id,
            "deleted_at": iso_time(task.deleted_at) if task.deleted_at else None,
        }
        assert state == current, f"task {task_id}: replaying its audit chain does not give its current state"


async def test_a_stalled_transaction_is_ended_and_the_writers_it_blocked_go_on(
    settings: Settings, era: str, db: Database
) -> None:
    """A server process frozen inside a call (here: a session that locked a task and then does
    nothing) is cut off after idle_in_transaction_timeout_ms, and a writer waiting on its lock
    then succeeds. PostgreSQL only: on SQLite no session outlives its process."""
    if db.is_sqlite:
        pytest.skip("SQLite has no database sessions to end; a process holds the file's lock itself")
    stalling = settings.model_copy(update={"idle_in_transaction_timeout_ms": 1000, "lock_timeout_ms": 8000})
    async with connect(stalling, era) as client:
        task = await make_task(client, await make_project(client))
        frozen = create_database(stalling)
        try:
            with pytest.raises(DATABASE_ERRORS):
                async with frozen.session(write=True) as session:
                    await session.exec(
                        update(Task).where(col(Task.id) == task["id"]).values(priority="high"),
                        execution_options={"synchronize_session": False},
                    )
                    # Frozen, holding the task's row: another writer waits for it. Without the idle
                    # timeout it would wait out its lock_timeout (8 s) and fail "busy".
                    changed = await call(client, "update_task", {"task_id": task["id"], "title": "went on"})
                    assert changed["title"] == "went on"
                    await session.exec(select(func.count()).select_from(Task))  # the session is gone
        finally:
            await frozen.dispose()
        assert (await call(client, "get_task", {"task_id": task["id"]}))["priority"] == "medium"


async def test_a_role_that_can_only_connect_cannot_stop_the_writers_that_take_turns(
    settings: Settings, era: str, db: Database
) -> None:
    """Creates of one title and changes of the dependency graph take turns on PostgreSQL. A role
    granted nothing but CONNECT can neither take their turns (rows of lock_slot) nor hold them up
    with advisory locks, as it could while they took advisory locks: then every such write waited
    out its lock_timeout and failed "busy"."""
    if db.is_sqlite:
        pytest.skip("SQLite's writers take turns on the file's lock; there are no other roles")
    waiting = settings.model_copy(update={"lock_timeout_ms": 2000})
    outsider = create_database(Settings(database_url=await as_outsider(db, settings.database_url)))
    try:
        async with connect(waiting, era) as client, outsider.engine.connect() as conn:
            project = await make_project(client)
            blocker = await make_task(client, project)
            # Every advisory lock the server ever took, held for as long as the outsider likes.
            await conn.execute(text("SELECT pg_advisory_lock(7243017110401)"))  # the graph's
            await conn.execute(
                text("SELECT pg_advisory_lock(72430171, hashtext(:key))"),
                {"key": f"{project}:{titles.key('Plan')}"},
            )
            for lock in ("SELECT slot FROM lock_slot FOR UPDATE", "LOCK TABLE lock_slot"):
                with pytest.raises(DBAPIError, match="permission denied"):
                    async with conn.begin_nested():
                        await conn.execute(text(lock))
            created = await call(client, "create_task", {"project_id": project, "title": "Plan"})
            waits = await call(
                client, "add_dependency", {"task_id": created["id"], "blocked_by": blocker["id"]}
            )
            assert [task["id"] for task in waits["blocked_by"]] == [blocker["id"]]
    finally:
        await outsider.dispose()
