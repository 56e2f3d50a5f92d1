"""Faults: malformed frames, closed pipes, signals and lost connections, against real processes."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from sqlalchemy import text

from mcp_server.db import Database
from tests.conftest import count_rows

pytestmark = pytest.mark.anyio

PROTOCOL = "2025-11-25"


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
        request_id = self.next_id
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        await self.send_raw(json.dumps(message).encode())
        with anyio.fail_after(30):
            while True:
                line = await self.stdout.receive_until(b"\n", 64 * 1024 * 1024)
                answer = json.loads(line)
                if answer.get("id") == request_id:
                    return dict(answer)

    async def initialize(self) -> None:
        params = {
            "protocolVersion": PROTOCOL,
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"},
        }
        assert "result" in await self.request("initialize", params)
        await self.send_raw(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode())


@asynccontextmanager
async def stdio_server(database_url: str) -> AsyncIterator[StdioPeer]:
    env = {**os.environ, "DATABASE_URL": database_url, "MCP_AGENT_ID": "raw-agent"}
    process = await anyio.open_process(
        [sys.executable, "-m", "mcp_server", "serve"], env=env, stderr=None if os.environ.get("DEBUG") else -3
    )
    try:
        peer = StdioPeer(process)
        await peer.initialize()
        yield peer
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


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
