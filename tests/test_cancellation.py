"""A cancelled call never commits, and its statement stops on the database: over stdio, stateful
HTTP and stateless HTTP, in both protocol eras, on both databases.

The call under test is a bulk status change that cannot finish on its own: the test holds a lock
it needs (a row lock on PostgreSQL, the write lock on SQLite). So the call is still running when
it is cancelled, and on PostgreSQL the test sees, while it still holds the lock, whether the
server's statement stopped. The server logs the end of a cancelled call; only then does the test
let go of the lock, so a call that was not really cancelled would go on and commit, and be seen."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
from anyio.abc import TaskGroup
from sqlalchemy import text

from mcp_server.auth import mint_token, token_sha256
from mcp_server.db import APPLICATION_NAME, Database
from tests.conftest import http_client, http_server
from tests.test_faults import BULK_TASKS, seed_many, stdio_server
from tests.test_stdio_calls import answers_until, call_frame, cancel_frame

pytestmark = pytest.mark.anyio

PENDING = {"field": "status", "op": "eq", "value": "pending"}
CANCELLED_CHANGE = {"status": "blocked", "filter": PENDING}
NEXT_CHANGE = {"status": "in_progress", "filter": PENDING}
ENDED = "the call was cancelled before it committed; its transaction was rolled back"
TRANSPORTS = ["stdio", "stateful-legacy", "stateful-auto", "stateless-legacy", "stateless-auto"]


@dataclass
class Served:
    """A server process and the client that talks to it; `peer` is a raw stdio peer or an SDK client."""

    transport: str
    peer: Any
    log: Path

    async def start_change(self, group: TaskGroup) -> Callable[[], Awaitable[None]]:
        """Start the bulk change that will be cancelled; return what cancels it."""
        if self.transport == "stdio":
            await self.peer.send_raw(call_frame(4242, "bulk_update_status", CANCELLED_CHANGE))
            return lambda: self.peer.send_raw(cancel_frame(4242))
        scope = anyio.CancelScope()

        async def run() -> None:
            with scope:
                result = await self.peer.call_tool("bulk_update_status", CANCELLED_CHANGE)
                raise AssertionError(f"the cancelled call was answered: {result}")

        group.start_soon(run)

        async def cancel() -> None:
            scope.cancel()

        return cancel

    async def next_change(self) -> dict[str, Any]:
        if self.transport == "stdio":
            await self.peer.send_raw(call_frame(1, "bulk_update_status", NEXT_CHANGE))
            frames = await answers_until(self.peer, 1)
            assert [frame.get("id") for frame in frames] == [1], "the cancelled call was answered"
            assert not frames[0]["result"]["isError"], frames[0]
            return dict(frames[0]["result"]["structuredContent"])
        result = await self.peer.call_tool("bulk_update_status", NEXT_CHANGE)
        assert not result.is_error, result.content
        return dict(result.structured_content)

    async def logged(self, *parts: str) -> None:
        """Wait until the server logs a line that holds every one of `parts`."""
        with anyio.fail_after(15):
            while not any(  # noqa: ASYNC110
                all(part in line for part in parts)
                for line in (await anyio.Path(self.log).read_text()).splitlines()
            ):
                await anyio.sleep(0.05)  # another process writes the file: nothing to wait on but it


@asynccontextmanager
async def served(transport: str, database_url: str, tmp_path: Path) -> AsyncIterator[Served]:
    """A server process of the kind `transport` names, and a client of it."""
    if transport == "stdio":
        log = tmp_path / "stdio.log"
        async with stdio_server(database_url, log, LOG_LEVEL="DEBUG") as peer:
            yield Served(transport, peer, log)
        return
    token = mint_token()
    config = {
        "database_url": database_url,
        "log_level": "DEBUG",  # each statement, with the call that sent it
        "agents": [{"id": "canceller", "token_sha256": token_sha256(token)}],
    }
    mode, era = transport.split("-")
    with http_server(tmp_path, config, extra_args=["--stateless"] if mode == "stateless" else []) as url:
        async with http_client(url, token, era=era) as client:
            yield Served(transport, client, tmp_path / f"server-{urlsplit(url).port}.log")


@asynccontextmanager
async def holding_a_lock(db: Database) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Hold what the bulk change needs until the function it yields is awaited: on PostgreSQL a
    row lock on the last task, on SQLite the file's write lock."""
    if db.is_sqlite:
        assert db.engine.url.database is not None
        raw = sqlite3.connect(db.engine.url.database, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")

        async def release_file() -> None:
            if raw.in_transaction:
                raw.execute("ROLLBACK")

        try:
            yield release_file
        finally:
            await release_file()
            raw.close()
        return
    async with db.engine.connect() as conn:
        # Named apart from the server's sessions, which the test watches.
        await conn.execute(text("SET application_name = 'cancellation-test'"))
        await conn.commit()
        transaction = await conn.begin()
        await conn.execute(text("SELECT id FROM entity WHERE id = (SELECT max(id) FROM entity) FOR UPDATE"))

        async def release_row() -> None:
            if transaction.is_active:
                await transaction.rollback()

        try:
            yield release_row
        finally:
            await release_row()


async def wait_for_server_sessions(
    db: Database, done: Callable[[list[dict[str, Any]]], bool], what: str
) -> None:
    """Poll the server's PostgreSQL sessions that are running something or hold a transaction
    open (the sealer's short rounds left out) until `done` says so."""
    query = text(
        "SELECT state, wait_event_type, query FROM pg_stat_activity "
        "WHERE application_name = :name AND datname = current_database() AND state <> 'idle' "
        "AND query NOT LIKE '%audit_chain%' AND query NOT LIKE '%audit_seal%' "
        "AND query NOT LIKE '%pg_snapshot_xmin%'"
    )
    sessions: list[dict[str, Any]] = []
    async with db.engine.connect() as conn:
        with anyio.move_on_after(15):
            while True:
                sessions = [
                    dict(row._mapping) for row in await conn.execute(query, {"name": APPLICATION_NAME})
                ]
                await conn.rollback()  # the activity view holds still within one transaction
                if done(sessions):
                    return
                await anyio.sleep(0.05)  # polling the catalog
    raise AssertionError(f"waited 15 s for {what}; the server's sessions: {sessions}")


async def statuses(db: Database) -> dict[str, int]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT status, count(*) FROM entity WHERE kind = 'task' GROUP BY status")
        )
        return {status: count for status, count in rows.all()}


async def audited_statuses(db: Database) -> list[str]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(text("SELECT DISTINCT new_value FROM audit_entry WHERE action = 'updated'"))
        return sorted(str(value) for (value,) in rows.all())


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_cancelled_call_stops_its_statement_commits_nothing_and_the_next_write_goes_through(
    transport: str, database_url: str, db: Database, tmp_path: Path
) -> None:
    await seed_many(db)
    async with served(transport, database_url, tmp_path) as server, anyio.create_task_group() as group:
        async with holding_a_lock(db) as release:
            cancel = await server.start_change(group)
            if db.is_sqlite:  # the call has asked for the write lock, which the test holds
                await server.logged("BEGIN IMMEDIATE", "tool=bulk_update_status")
            else:
                await wait_for_server_sessions(
                    db,
                    lambda sessions: any(s["wait_event_type"] == "Lock" for s in sessions),
                    "the lock wait",
                )
            await cancel()
            if not db.is_sqlite:
                # The lock is still held: only a cancelled statement can have gone away.
                await wait_for_server_sessions(db, lambda sessions: not sessions, "the statement to stop")
            await server.logged(ENDED)
            await release()
        with anyio.fail_after(20):
            done = await server.next_change()
    assert done["changed_count"] == BULK_TASKS
    assert await statuses(db) == {"in_progress": BULK_TASKS}, "the cancelled call committed something"
    assert "blocked" not in " ".join(await audited_statuses(db))


async def test_a_server_process_killed_mid_call_leaves_no_statement_running(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    if db.is_sqlite:
        pytest.skip("an embedded SQLite database has no statement that could outlive the process")
    await seed_many(db)
    async with holding_a_lock(db) as release:
        async with served("stdio", database_url, tmp_path) as server, anyio.create_task_group() as group:
            await server.start_change(group)
            await wait_for_server_sessions(
                db, lambda sessions: any(s["wait_event_type"] == "Lock" for s in sessions), "the lock wait"
            )
            server.peer.process.kill()
        # The lock is still held, so the statement could only have ended by being stopped: within
        # a second PostgreSQL checks whether its client is still there (client_connection_check_interval).
        await wait_for_server_sessions(
            db, lambda sessions: not sessions, "the dead process's statement to stop"
        )
        await release()
    assert await statuses(db) == {"pending": BULK_TASKS}
