"""Faults: malformed frames, closed pipes, signals and lost connections, against real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from sqlalchemy import make_url, text

from mcp_server import chain
from mcp_server.config import Settings
from mcp_server.db import APPLICATION_NAME, Database, create_database
from mcp_server.sealer import Sealer
from tests.conftest import (
    APP_ROLE,
    as_app_role,
    call,
    call_error,
    connect,
    count_rows,
    error_text,
    initialize_message,
)
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio


class StdioPeer:
    """A hand-rolled client that writes raw lines to the server's stdin and reads its stdout."""

    def __init__(self, process: Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.stdin = process.stdin
        self.stdout = BufferedByteReceiveStream(process.stdout)
        self.next_id = 1

    async def send_raw(self, line: bytes) -> None:
        await self.stdin.send(line + b"\n")

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.send({"jsonrpc": "2.0", "method": method, "params": params or {}})

    async def send(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request under the next id and wait for the answer that carries it."""
        request_id = self.next_id
        self.next_id += 1
        await self.send_raw(json.dumps({**message, "id": request_id}).encode())
        with anyio.fail_after(30):
            while True:
                line = await self.stdout.receive_until(b"\n", 64 * 1024 * 1024)
                answer = json.loads(line)
                if answer.get("id") == request_id:
                    return dict(answer)

    async def initialize(self) -> None:
        assert "result" in await self.send(initialize_message("raw"))
        await self.send_raw(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode())


@asynccontextmanager
async def stdio_server(database_url: str, log: Path | None = None, **env: str) -> AsyncIterator[StdioPeer]:
    """`mcp-task-server serve` on stdio with `env` added to its environment, its log written to
    `log` (or shown, with DEBUG set)."""
    env = {**os.environ, "DATABASE_URL": database_url, "MCP_AGENT_ID": "raw-agent", **env}
    stderr: Any = log.open("w") if log is not None else None if os.environ.get("DEBUG") else -3
    process = await anyio.open_process([sys.executable, "-m", "mcp_server", "serve"], env=env, stderr=stderr)
    try:
        peer = StdioPeer(process)
        await peer.initialize()
        yield peer
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if log is not None:
            stderr.close()


MALFORMED = [
    b"not json at all",
    b"{",
    b"[]",
    b"[1, 2, 3]",
    b"null",
    b"42",
    b'"a string"',
    b"\xff\xfe\x00 invalid utf-8",
    b'{"jsonrpc": "2.0"}',
    b'{"jsonrpc": "1.0", "id": 9001, "method": "tools/list"}',
    b'{"jsonrpc": "2.0", "id": 9002, "method": 5}',
    b'{"jsonrpc": "2.0", "id": {"nested": true}, "method": "tools/list"}',
    b'{"jsonrpc": "2.0", "id": 9003, "method": "tools/call", "params": "not an object"}',
    b'{"jsonrpc": "2.0", "id": 9004, "method": "tools/call", "params": {"name": 7}}',
    b'{"jsonrpc": "2.0", "id": 9005, "method": "no/such/method"}',
    b'{"jsonrpc": "2.0", "id": 9006, "result": "a response nobody asked for"}',
    b"x" * 5_000_000,
    b'{"jsonrpc": "2.0", "id": 9007, "method": "tools/call", "params": {"name": "create_project", '
    b'"arguments": {"name": "' + b"y" * 5_000_000 + b'"}}}',
]


async def test_after_every_malformed_frame_the_server_answers_the_next_valid_request_and_exits_cleanly(
    database_url: str, db: Database
) -> None:
    sessions_before = await server_sessions(db)
    async with stdio_server(database_url) as peer:
        answered = 0
        for frame in MALFORMED:
            await peer.send_raw(frame)
            reply = await peer.request("tools/call", {"name": "list_projects", "arguments": {}})
            assert reply["result"]["isError"] is False, frame[:80]
            answered += 1
        assert answered == len(MALFORMED)
        assert await count_rows(db, "entity") == 0  # the oversized create_project changed nothing
        await peer.stdin.aclose()  # the client went away: the server must notice and stop
        with anyio.fail_after(20):
            assert await peer.process.wait() == 0
    with anyio.fail_after(10):  # and its database sessions are gone
        while await server_sessions(db) != sessions_before:  # noqa: ASYNC110  (polling another process)
            await anyio.sleep(0.1)


async def server_sessions(db: Database) -> int:
    """PostgreSQL sessions opened by this server (the test's own included); 0 on SQLite."""
    if db.is_sqlite:
        return 0
    async with db.engine.connect() as conn:
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND pid <> pg_backend_pid()"
        )
        return int((await conn.execute(text(query), {"name": APPLICATION_NAME})).scalar_one())


BULK_TASKS = 60_000


async def seed_many(db: Database) -> None:
    """A project and BULK_TASKS pending tasks, written directly: enough for a bulk update to take a while."""
    async with db.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO entity (kind, title, description, created_at, updated_at, version) "
                "VALUES ('project', 'big', '', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 1)"
            )
        )
        columns = "kind, title, description, status, priority, project_id, created_at, updated_at, version"
        values = "'task', 'task ' || n, '', 'pending', 2, 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 1"
        numbers = (
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :count) SELECT n FROM g"
            if db.is_sqlite
            else "SELECT generate_series(1, :count) AS n"
        )
        insert = f"INSERT INTO entity ({columns}) SELECT {values} FROM ({numbers}) AS numbers"  # noqa: S608
        await conn.execute(text(insert), {"count": BULK_TASKS})


async def bulk_outcome(db: Database) -> tuple[int, int]:
    async with db.engine.connect() as conn:
        blocked = (await conn.execute(text("SELECT count(*) FROM entity WHERE status = 'blocked'"))).scalar()
        entries = (
            await conn.execute(text("SELECT count(*) FROM audit_entry WHERE action = 'updated'"))
        ).scalar()
    return int(blocked or 0), int(entries or 0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("delay", [0.05, 0.4])
async def test_a_signal_during_a_bulk_update_leaves_all_or_nothing_and_sigterm_exits_cleanly(
    database_url: str, db: Database, sig: signal.Signals, delay: float
) -> None:
    await seed_many(db)
    async with stdio_server(database_url) as peer:
        everything = {"field": "status", "op": "eq", "value": "pending"}
        message = {
            "jsonrpc": "2.0",
            "id": 4242,
            "method": "tools/call",
            "params": {
                "name": "bulk_update_status",
                "arguments": {"status": "blocked", "filter": everything},
            },
        }
        await peer.send_raw(json.dumps(message).encode())
        await anyio.sleep(delay)  # let the bulk update get under way: the property holds at any moment
        peer.process.send_signal(sig)
        with anyio.fail_after(20):
            code = await peer.process.wait()
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    blocked, entries = await bulk_outcome(db)
    assert blocked in (0, BULK_TASKS) and entries == blocked, "a bulk update was left half done"
    async with stdio_server(database_url) as peer:  # the database is fine for the next server
        reply = await peer.request("tools/call", {"name": "verify_audit_log", "arguments": {}})
        assert reply["result"]["structuredContent"]["ok"]


def postgres_only(db: Database, why: str) -> None:
    if db.is_sqlite:
        pytest.skip(why)


async def test_a_connection_killed_in_the_middle_of_a_bulk_update_changes_nothing_and_the_next_call_works(
    settings: Settings, db: Database
) -> None:
    postgres_only(db, "an embedded SQLite database has no server connection to kill")
    await seed_many(db)
    outcome: dict[str, Any] = {}

    async def bulk() -> None:
        async with connect(settings, "auto") as client:
            arguments = {"status": "blocked", "filter": {"field": "status", "op": "eq", "value": "pending"}}
            outcome["result"] = await client.call_tool("bulk_update_status", arguments)

    async with anyio.create_task_group() as group:
        group.start_soon(bulk)
        killed = 0
        with anyio.fail_after(30):
            while not killed and "result" not in outcome:
                async with db.engine.connect() as conn:
                    killed = (
                        await conn.execute(
                            text(
                                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE datname = current_database() AND state = 'active' "
                                # The bulk update's one statement, by its start: PostgreSQL keeps
                                # only the first 1,024 bytes of a query's text here.
                                "AND pid <> pg_backend_pid() AND query LIKE 'WITH \"old\" AS%'"
                            )
                        )
                    ).scalar_one()
    assert killed == 1, "the bulk update finished before it could be interrupted"
    result = outcome["result"]
    assert result.is_error and "retry" in result.content[0].text
    assert await bulk_outcome(db) == (0, 0)
    async with connect(settings, "auto") as client:
        again = await call(client, "bulk_update_status", {"status": "blocked", "task_ids": [2, 3]})
        assert again["changed_count"] == 2


async def test_an_exhausted_pool_means_a_bounded_wait_then_busy_retry_never_a_hang(
    settings: Settings, db: Database
) -> None:
    # The sealer stays off: the one connection under test is the calls'.
    one_connection = settings.model_copy(
        update={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.5, "sealer": False}
    )
    held, release = anyio.Event(), anyio.Event()
    results: list[Any] = []

    async def another_writer() -> None:
        async with db.session(write=True) as session:  # holds SQLite's write lock
            if not db.is_sqlite:  # PostgreSQL: the project's row, which a new task's key must share
                await session.exec(
                    text("SELECT id FROM entity WHERE id = :id FOR UPDATE"), params={"id": project}
                )
            held.set()
            await release.wait()

    async with connect(one_connection, "auto") as client:
        project = await make_project(client)

        async def write() -> None:
            results.append(await client.call_tool("create_task", {"title": "t", "project_id": project}))

        async with anyio.create_task_group() as group:
            group.start_soon(another_writer)
            await held.wait()
            group.start_soon(write)
            await anyio.sleep(0.3)  # the write now waits for the lock, holding the pool's only connection
            started = anyio.current_time()
            message = await call_error(client, "search_tasks", {})
            waited = anyio.current_time() - started
            release.set()
        assert "busy" in message and "retry" in message
        assert 0.4 < waited < 5, f"waited {waited:.2f} s for a connection"
        assert not results[0].is_error, "the waiting write completes once the lock is free"
        assert len((await call(client, "search_tasks", {}))["items"]) == 1


async def test_postgresql_restarted_between_calls_costs_at_most_one_retryable_error(
    settings: Settings, db: Database
) -> None:
    postgres_only(db, "there is no database server to restart for SQLite")
    if os.environ.get("TEST_RESTART_POSTGRES") != "1":
        # The server may be shared with other databases and users: restart it only when asked.
        pytest.skip("restarts PostgreSQL; set TEST_RESTART_POSTGRES=1 to run it (.ci/run does, in CI)")
    clusters = Path("/etc/postgresql")
    cluster = sorted(p.name for p in clusters.iterdir())[-1] if clusters.is_dir() else None  # noqa: ASYNC240
    if cluster is None or shutil.which("pg_ctlcluster") is None:
        pytest.skip("pg_ctlcluster is not available to restart PostgreSQL")
    async with connect(settings, "legacy") as client:
        await make_project(client)
        restart = ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart"]
        try:
            await anyio.run_process(restart)
        finally:
            await anyio.run_process(
                ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "start"], check=False
            )
        results = [await client.call_tool("list_projects", {}) for _ in range(3)]
        results.append(await client.call_tool("create_project", {"name": "after the restart"}))
    errors = [r for r in results if r.is_error]
    assert len(errors) <= 1 and all("retry" in e.content[0].text for e in errors)
    assert not results[-1].is_error and not results[-2].is_error


DEEP = '{"a": ' * 300 + "1" + "}" * 300
# Requests the protocol's reader cannot read, each with the answer it must get: (line, id, code).
UNREADABLE = [
    ('{"jsonrpc": "2.0", "id": 101, "method": "tools/list", "params": {"cursor": "\\ud800"}}', 101, -32700),
    ('{"jsonrpc": "2.0", "id": 102, "method": "tools/\\udfff"}', 102, -32700),
    ('{"jsonrpc": "2.0", "id": 103, "method": "ping", "params": ' + DEEP + "}", 103, -32600),
    ('{"jsonrpc": "2.0", "id": 104, "method": "tools/call", "params": [1, 2]}', 104, -32602),
    ('{"jsonrpc": "2.0", "id": 105, "method": 5}', 105, -32600),
    ('{"id": 106, "method": "ping"}', 106, -32600),
    ('{"jsonrpc": "1.0", "id": 107, "method": "ping"}', 107, -32600),
    ('{"jsonrpc": "2.0", "id": 108, "method": "tools/call", "params": "not an object"}', 108, -32600),
    ('{"jsonrpc": "2.0", "id": true, "method": "ping"}', None, -32600),
    ('{"jsonrpc": "2.0", "id": 1.5, "method": "ping"}', None, -32600),
    ('{"jsonrpc": "2.0", "id": 109, "method": "ping"} and more', None, -32700),
]


async def test_every_request_the_server_cannot_read_gets_exactly_one_error_answer(database_url: str) -> None:
    async with stdio_server(database_url) as peer:
        for line, _, _ in UNREADABLE:
            await peer.send_raw(line.encode("utf-8", "surrogatepass"))
        # Neither a notification nor a stray response gets an answer, readable or not.
        await peer.send_raw(b'{"jsonrpc": "2.0", "method": "notifications/\\ud800"}')
        await peer.send_raw(b'{"jsonrpc": "2.0", "id": 110, "result": {"x": ' + DEEP.encode() + b"}}")
        await peer.send_raw(b'{"jsonrpc": "2.0", "id": 999, "method": "ping"}')
        answers = []
        with anyio.fail_after(10):  # every answer comes before the ping's: the lines are read in turn
            while not answers or answers[-1].get("id") != 999:
                answers.append(json.loads(await peer.stdout.receive_until(b"\n", 1 << 20)))
        assert answers.pop() == {"jsonrpc": "2.0", "id": 999, "result": {}}
        assert [(answer["id"], answer["error"]["code"]) for answer in answers] == [
            (request_id, code) for _, request_id, code in UNREADABLE
        ]
        # The answers say what was wrong without carrying the input back.
        assert not any("cursor" in json.dumps(answer) or '"a"' in json.dumps(answer) for answer in answers)
        assert "lone surrogate" in answers[0]["error"]["message"]


async def test_over_the_roles_connection_limit_a_call_is_told_busy_and_to_retry(
    settings: Settings, db: Database, database_url: str, era: str
) -> None:
    """A role's connection limit (or the server's) refuses new sessions: a call that meets it is
    told the database is busy and to retry, not to report a fault. PostgreSQL only."""
    if db.is_sqlite:
        pytest.skip("connection limits are a PostgreSQL feature")
    as_app = await as_app_role(db, database_url)
    limited = settings.model_copy(update={"database_url": as_app, "sealer": False})
    async with db.engine.begin() as conn:
        await conn.execute(text(f"ALTER ROLE {APP_ROLE} CONNECTION LIMIT 1"))
    try:
        async with connect(limited, era) as client:
            results = []

            async def search() -> None:
                results.append(await client.call_tool("search_tasks", {}))

            async with anyio.create_task_group() as group:
                for _ in range(6):
                    group.start_soon(search)
        failed = [error_text(result) for result in results if result.is_error]
        assert failed, "six calls at once on one allowed connection: some meet the limit"
        assert all("busy right now; nothing was changed, retry" in message for message in failed), failed
    finally:
        async with db.engine.begin() as conn:
            await conn.execute(text(f"ALTER ROLE {APP_ROLE} CONNECTION LIMIT -1"))


class LosesCommitAcks:
    """A TCP proxy in front of PostgreSQL that, once armed, passes a COMMIT on to the server and
    then cuts the connection before the server's answer comes back: the change commits, and the
    server that sent it never hears so (a lost acknowledgement)."""

    def __init__(self, upstream_port: int, after: bytes = b"") -> None:
        """`after`: cut only the COMMIT of a transaction that sent this (any, if empty)."""
        self.upstream_port = upstream_port
        self.after = after
        self.armed = False
        self.cut = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        cutting = asyncio.Event()

        holding = asyncio.Event()  # from the COMMIT on, nothing goes back to the client

        async def upstream() -> None:
            seen = not self.after
            while data := await client_in.read(65536):
                seen = seen or self.after in data
                if self.armed and seen and b"COMMIT" in data:  # a simple Query message: Q, length, COMMIT;
                    self.armed = False
                    holding.set()
                server_out.write(data)
                await server_out.drain()

        async def downstream() -> None:
            while data := await server_in.read(65536):
                if holding.is_set():  # the COMMIT's answer: the server has committed; drop it, cut
                    self.cut += 1
                    cutting.set()
                    return
                client_out.write(data)
                await client_out.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        await asyncio.wait([*tasks, asyncio.create_task(cutting.wait())], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for writer in (client_out, server_out):
            writer.close()


async def test_a_lost_commit_acknowledgement_says_the_change_may_have_been_applied_and_how_to_check(
    settings: Settings, db: Database, database_url: str, era: str
) -> None:
    """The COMMIT reaches PostgreSQL and commits, and its answer is lost: the agent is told the
    change may have been applied, with the request id to look for, and a retry with the same
    idempotency key returns the first result without changing anything again. PostgreSQL only."""
    if db.is_sqlite:
        pytest.skip("SQLite commits in the server's own process: no acknowledgement can be lost")
    url = make_url(database_url)
    proxy = LosesCommitAcks(url.port or 5432)
    async with proxy as port:
        through = settings.model_copy(
            update={"database_url": url.set(port=port).render_as_string(hide_password=False), "sealer": False}
        )
        async with connect(through, era) as client:
            task = await make_task(client, await make_project(client))
            change = {"task_id": task["id"], "title": "changed once", "idempotency_key": "lost-ack-1"}
            proxy.armed = True
            message = await call_error(client, "update_task", change)
            assert proxy.cut == 1
            assert "may have been applied or not" in message and "same idempotency_key" in message
            request_id = re.search(r"look for request ([0-9a-f]{32})", message)
            assert request_id is not None, message
            # It was applied: the audit log has it under that request, and a retry changes nothing more.
            trail = await call(client, "get_audit_trail", {"request_id": request_id.group(1)})
            assert [entry["action"] for entry in trail["items"]] == ["updated"]
            retried = await call(client, "update_task", change)
            assert (retried["title"], retried["version"]) == ("changed once", task["version"] + 1)
            updates = await call(client, "get_audit_trail", {"entity_id": task["id"], "action": "updated"})
            assert len(updates["items"]) == 1


async def test_the_sealer_goes_on_after_losing_the_acknowledgement_of_its_own_commit(
    settings: Settings, db: Database, database_url: str, era: str
) -> None:
    """A sealing round whose COMMIT's answer is lost (PostgreSQL restarting under it) may or may
    not have sealed; the sealer goes on with its next round, which reads the chain as it is, and
    every entry is sealed. It used to end for good on that error, leaving the log unsealed.
    PostgreSQL only."""
    if db.is_sqlite:
        pytest.skip("SQLite commits in the server's own process: no acknowledgement can be lost")
    url = make_url(database_url)
    proxy = LosesCommitAcks(url.port or 5432, after=b"INSERT INTO audit_seal")
    async with proxy as port, connect(settings.model_copy(update={"sealer": False}), era) as client:
        through = settings.model_copy(update={"database_url": url.set(port=port).render_as_string()})
        sealing = create_database(through)
        sealer = Sealer(sealing, through, None)
        try:
            async with anyio.create_task_group() as tasks:
                project = await make_project(client)
                proxy.armed = True
                tasks.start_soon(sealer.run)
                with anyio.fail_after(30):
                    while proxy.cut == 0:  # noqa: ASYNC110  # polling the proxy, with a deadline
                        await anyio.sleep(0.05)
                    await make_task(client, project)
                    while await unsealed(db):  # noqa: ASYNC110  # polling the database, with a deadline
                        await anyio.sleep(0.05)
                sealer.stop()
        finally:
            await sealing.dispose()
        assert (await call(client, "verify_audit_log"))["ok"]


async def unsealed(db: Database) -> int:
    async with db.session(write=False) as session:
        return await chain.unsealed_up_to(session, 2**62)
