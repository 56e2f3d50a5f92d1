"""Every tool call runs its statements through an ORM session, on both databases.

Listeners watch three levels at once while every tool is called: the ORM sessions (each
statement executed through one fires do_orm_execute; the statements a flush writes come between
before_flush and after_flush), SQLAlchemy's cursor executions, and, on PostgreSQL, asyncpg's own
log of the queries it ran, so that a statement sent past SQLAlchemy would be seen too.
"""

from __future__ import annotations

import re
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.pool import Pool

from mcp_server.config import AgentConfig, Settings
from mcp_server.db import TaskSession
from tests.conftest import call, call_error, connect

pytestmark = pytest.mark.anyio

# What asyncpg runs by itself: transaction control for SQLAlchemy's begin, commit and rollback, and
# the introspection of a type it meets for the first time (with JIT off while it does).
_DRIVER_OWN = re.compile(r"^\s*(BEGIN|COMMIT|ROLLBACK)\b|set_config\('jit'|\bpg_catalog\.pg_type\b")


@dataclass
class Watch:
    tool: str = ""  # the call under way; none while the servers start
    orm_executions: Counter[str] = field(default_factory=Counter)
    flushing: bool = False
    session_connections: weakref.WeakSet[Connection] = field(default_factory=weakref.WeakSet)
    # tool, SQL, sent on a session's connection, sent by a flush
    sent: list[tuple[str, str, bool, bool]] = field(default_factory=list)
    driver_ran: list[tuple[str, str]] = field(default_factory=list)  # tool, SQL (PostgreSQL only)


@contextmanager
def watching() -> Iterator[Watch]:
    watch = Watch()

    def on_orm_execute(state: ORMExecuteState) -> None:
        watch.orm_executions[watch.tool] += 1

    def on_begin(_session: Any, _transaction: Any, connection: Connection) -> None:
        watch.session_connections.add(connection)

    def on_flush(*_: Any) -> None:
        watch.flushing = True

    def on_flushed(*_: Any) -> None:
        watch.flushing = False

    def on_cursor(conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        watch.sent.append((watch.tool, statement, conn in watch.session_connections, watch.flushing))

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        driver = dbapi_connection.driver_connection
        if hasattr(driver, "add_query_logger"):  # asyncpg
            driver.add_query_logger(lambda logged: watch.driver_ran.append((watch.tool, logged.query)))

    listeners = [
        (TaskSession, "do_orm_execute", on_orm_execute),
        (TaskSession, "after_begin", on_begin),
        (TaskSession, "before_flush", on_flush),
        (TaskSession, "after_flush_postexec", on_flushed),
        (Engine, "before_cursor_execute", on_cursor),
        (Pool, "connect", on_connect),
    ]
    for target, name, fn in listeners:
        event.listen(target, name, fn)
    try:
        yield watch
    finally:
        for target, name, fn in listeners:
            event.remove(target, name, fn)


async def test_every_statement_of_every_tool_call_goes_through_an_orm_session(settings: Settings) -> None:
    # The audit sealer runs beside the calls in a task of its own, with statements of its own (also
    # through sessions, db.Database.session): off here, so that each statement is a call's.
    settings = settings.model_copy(update={"sealer": False})
    # A narrow agent beside, so that a refused call (recorded in a session of its own) is watched too.
    narrow = settings.model_copy(
        update={"agents": (AgentConfig(id="narrow", tools=frozenset({"get_task"})),)}
    )
    with watching() as watch:
        async with connect(settings, "legacy") as client, connect(narrow, "legacy", name="narrow") as other:

            async def each(tool: str, arguments: dict[str, Any]) -> Any:
                watch.tool = tool
                return await call(client, tool, arguments)

            project = (await each("create_project", {"name": "Watched"}))["id"]
            task = (await each("create_task", {"title": "t", "project_id": project, "idempotency_key": "k"}))[
                "id"
            ]
            await each("search_tasks", {"filter": {"field": "project_id", "op": "eq", "value": project}})
            await each("search_tasks", {"include_total": True, "include_deleted": True})
            await each("get_task", {"task_id": task})
            await each("update_task", {"task_id": task, "priority": "high", "expected_version": 1})
            await each("soft_delete_task", {"task_id": task})
            await each("restore_task", {"task_id": task})
            await each("bulk_update_status", {"status": "blocked", "task_ids": [task], "dry_run": True})
            await each(
                "bulk_update_status",
                {"status": "blocked", "filter": {"field": "id", "op": "eq", "value": task}},
            )
            await each("get_audit_trail", {"entity_id": task})
            await each("get_audit_trail", {"changed_by": "test-agent", "limit": 2})
            await each("list_projects", {"name_contains": "watch"})
            await each("verify_audit_log", {})
            watch.tool = "refused search_tasks"
            await call_error(other, "search_tasks", {})
    calls = [entry for entry in watch.sent if entry[0]]  # not the servers' start
    tools = {tool for tool, *_ in calls}
    assert len(tools) == 12  # every tool above sent statements, the refusal too
    for tool in tools:
        # SQLite's BEGIN is issued by SQLAlchemy's begin event, just before the session hears of it.
        statements = [entry for entry in calls if entry[0] == tool and not entry[1].startswith("BEGIN")]
        for _, statement, in_session, _ in statements:
            assert in_session, f"{tool} sent a statement outside a session: {statement}"
        flushed = sum(by_flush for *_, by_flush in statements)
        assert len(statements) == watch.orm_executions[tool] + flushed, (
            f"{tool}: {len(statements)} statements, {watch.orm_executions[tool]} executed through a "
            f"session and {flushed} written by its flush"
        )
    through_sqlalchemy = {statement for _, statement, *_ in calls}
    for tool, query in watch.driver_ran:
        assert query in through_sqlalchemy or _DRIVER_OWN.search(query), (
            f"{tool}: asyncpg ran a statement SQLAlchemy did not send: {query}"
        )
    if not settings.database_url.startswith("sqlite"):
        # The log was on: it holds the transactions' BEGIN and COMMIT that asyncpg ran directly.
        assert {tool for tool, _ in watch.driver_ran} >= {"create_task", "bulk_update_status"}
