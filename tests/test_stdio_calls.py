"""tools/call on stdio, raw frames against real server processes: calls that run side by side,
cancellation, and the end of stdin."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from mcp_server.db import Database
from tests.test_faults import StdioPeer, bulk_outcome, seed_many, stdio_server

pytestmark = pytest.mark.anyio


def call_frame(request_id: int | str, name: str, arguments: Any) -> bytes:
    """A raw tools/call request."""
    params: dict[str, Any] = {"name": name, "arguments": arguments}
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}).encode()


def cancel_frame(request_id: int | str) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": request_id}}
    ).encode()


async def test_calls_sent_together_are_each_answered_once_under_their_own_id(database_url: str) -> None:
    async with stdio_server(database_url) as peer:
        for i in range(6):
            await peer.send_raw(call_frame(f"p{i}", "create_project", {"name": f"project {i}"}))
        answers: dict[str, Any] = {}
        with anyio.fail_after(30):
            while len(answers) < 6:
                answer = json.loads(await peer.stdout.receive_until(b"\n", 1 << 20))
                assert answer["id"] not in answers
                answers[answer["id"]] = answer["result"]["structuredContent"]["name"]
        assert answers == {f"p{i}": f"project {i}" for i in range(6)}


def bulk_frame(request_id: int) -> bytes:
    everything = {"field": "status", "op": "eq", "value": "pending"}
    return call_frame(request_id, "bulk_update_status", {"status": "blocked", "filter": everything})


async def answers_until(peer: StdioPeer, request_id: int) -> list[dict[str, Any]]:
    """Every frame the server writes up to and including the answer to `request_id`."""
    frames = []
    with anyio.fail_after(30):
        while not frames or frames[-1].get("id") != request_id:
            frames.append(json.loads(await peer.stdout.receive_until(b"\n", 1 << 20)))
    return frames


async def test_a_cancelled_call_is_never_answered_and_its_changes_roll_back(
    database_url: str, db: Database
) -> None:
    await seed_many(db)
    async with stdio_server(database_url) as peer:
        await peer.send_raw(bulk_frame(4242))
        await anyio.sleep(0.3)  # under way: BULK_TASKS tasks take seconds
        await peer.send_raw(cancel_frame(4242))
        # A write waits its turn behind the bulk update, so it completes once that is cancelled and
        # rolled back, or, were the cancel ignored, once it had committed.
        await peer.send_raw(call_frame(1, "create_project", {"name": "after"}))
        frames = await answers_until(peer, 1)
        outcome = await bulk_outcome(db)
        await anyio.sleep(0.5)  # time for a late answer to show up before the next one
        await peer.send_raw(call_frame(2, "verify_audit_log", {}))
        frames += await answers_until(peer, 2)
    assert outcome == (0, 0)
    assert [frame["id"] for frame in frames] == [1, 2], "the cancelled call was answered"
    assert not frames[0]["result"]["isError"] and frames[1]["result"]["structuredContent"]["ok"]


async def test_calls_running_when_stdin_closes_are_answered_connection_closed_and_roll_back(
    database_url: str, db: Database
) -> None:
    await seed_many(db)
    async with stdio_server(database_url) as peer:
        await peer.send_raw(bulk_frame(77))
        await anyio.sleep(0.3)
        await peer.stdin.aclose()
        with anyio.fail_after(30):
            answer = json.loads(await peer.stdout.receive_until(b"\n", 1 << 20))
            assert await peer.process.wait() == 0
    assert answer == {"jsonrpc": "2.0", "id": 77, "error": {"code": -32000, "message": "Connection closed"}}
    assert await bulk_outcome(db) == (0, 0)


async def test_a_call_cancelled_in_the_same_read_as_it_arrived_never_runs(
    database_url: str, db: Database
) -> None:
    async with stdio_server(database_url) as peer:
        await peer.send_raw(call_frame(7, "create_project", {"name": "never"}) + b"\n" + cancel_frame(7))
        await peer.send_raw(call_frame(8, "list_projects", {}))
        frames = await answers_until(peer, 8)
        await peer.stdin.aclose()
        with anyio.fail_after(10):  # nothing left waiting on the call that never ran
            assert await peer.process.wait() == 0
    assert [frame["id"] for frame in frames] == [8]
    assert frames[0]["result"]["structuredContent"]["items"] == []
