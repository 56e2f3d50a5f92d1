"""An HTTP server process under floods, bounded in count and time and on loopback only: what one
agent may take (requests a second, sessions), what any client may hold (connections, time to send
its request), and that real agents are served all the while."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx2
import pytest

from mcp_server.auth import mint_token, token_sha256
from mcp_server.limits import Sessions
from tests.conftest import call, http_client, http_server, initialize_message
from tests.test_http import MCP_HEADERS

pytestmark = pytest.mark.anyio

# A real agent's call during a flood is answered within this (a bound, not a measurement).
SERVED_WITHIN_SECONDS = 5


def agents(*ids: str, read_only: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], dict[str, str]]:
    tokens = {agent: mint_token() for agent in ids}
    entries: list[dict[str, Any]] = [
        {
            "id": agent,
            "token_sha256": token_sha256(token),
            **({"read_only": True} if agent in read_only else {}),
        }
        for agent, token in tokens.items()
    ]
    return entries, tokens


def whole_response(raw: bytes) -> bool:
    """Whether `raw` is one HTTP response whose body is exactly as long as it says."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lengths = [
        line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    ]
    return len(lengths) == 1 and int(lengths[0]) == len(body)


async def unfinished_post(port: int, token: str) -> anyio.abc.SocketStream:
    """A connection that has sent a POST to /mcp and the first byte of its 1,000-byte body."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    head = f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    await stream.send(f"{head}Authorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n{{".encode())
    return stream


async def open_session(raw: httpx2.AsyncClient, url: str, token: str) -> httpx2.Response:
    headers = MCP_HEADERS | {"Authorization": f"Bearer {token}"}
    return await raw.post(url, headers=headers, json=initialize_message("flood"))


async def test_one_agent_cannot_take_the_sessions_every_other_agent_needs(
    database_url: str, tmp_path: Path
) -> None:
    """A read-only agent opening sessions as fast as it can gets 5 (its limit) and then 429 with
    Retry-After; sessions ended the moment they open are not counted; a DELETE the SDK refuses
    frees nothing; calls of a protocol era without sessions are not counted; another agent still
    opens sessions and calls tools; a session ended with DELETE frees its place; at the process's
    total, a new session gets 503 with Retry-After."""
    entries, tokens = agents("flooder", "worker", "third", read_only=("flooder",))
    config = {
        "database_url": database_url,
        "agents": entries,
        "http_max_sessions_per_agent": 5,
        "http_max_sessions": 8,
    }
    with http_server(tmp_path, config) as url:
        async with httpx2.AsyncClient() as raw:
            flooder = {"Authorization": f"Bearer {tokens['flooder']}"}
            for _ in range(25):  # opened and ended at once, before the answer's stream is over
                opening = await open_session(raw, url, tokens["flooder"])
                ending = await raw.delete(
                    url, headers=flooder | {"Mcp-Session-Id": opening.headers["mcp-session-id"]}
                )
                assert (opening.status_code, ending.status_code) == (200, 200)
            answers = [await open_session(raw, url, tokens["flooder"]) for _ in range(50)]
            statuses = [answer.status_code for answer in answers]
            assert statuses == [200] * 5 + [429] * 45
            refused = answers[5]
            assert int(refused.headers["retry-after"]) >= 1
            assert "flooder already has 5 open sessions" in refused.json()["error"]["message"]
            first = answers[0].headers["mcp-session-id"]
            refused_end = await raw.delete(
                url, headers=flooder | {"Mcp-Session-Id": first, "Origin": "http://evil.example"}
            )
            assert refused_end.status_code == 403  # the SDK keeps the session: so does the count
            assert (await open_session(raw, url, tokens["flooder"])).status_code == 429
            # A later protocol era has no sessions: its calls are served at the limit.
            async with http_client(url, tokens["flooder"], era="auto") as modern:
                assert (await call(modern, "search_tasks", {}))["items"] == []
            with anyio.fail_after(SERVED_WITHIN_SECONDS):
                async with http_client(url, tokens["worker"]) as worker:
                    assert (await call(worker, "search_tasks", {}))["items"] == []
                    ended = await raw.delete(url, headers=flooder | {"Mcp-Session-Id": first})
                    assert ended.status_code == 200
                    assert (await open_session(raw, url, tokens["flooder"])).status_code == 200
                    # 5 of the flooder's and the worker's: 2 more fill the process's 8.
                    third = [(await open_session(raw, url, tokens["third"])).status_code for _ in range(3)]
                    assert third == [200, 200, 503]
                    full = await open_session(raw, url, tokens["third"])
                    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
                    assert "http_max_sessions" in full.json()["error"]["message"]
                    # Sessions already open go on being served.
                    assert (await call(worker, "search_tasks", {}))["items"] == []


async def test_an_agent_over_its_request_rate_waits_its_turn_or_gets_429_with_retry_after(
    database_url: str, tmp_path: Path
) -> None:
    """At 5 requests a second (10 saved for a burst): 40 requests at once get the burst at once,
    the next 5 after waiting their turn (up to 1 s), and the rest 429 with Retry-After; the other
    agent is not slowed; one request after another, the agent is slowed to the rate and never
    refused; after Retry-After it is served at once again."""
    entries, tokens = agents("eager", "calm")
    config = {
        "database_url": database_url,
        "agents": entries,
        "http_requests_per_second": 5,
        "http_stateless": True,
    }
    with http_server(tmp_path, config) as url:
        async with httpx2.AsyncClient(timeout=30) as raw:
            headers = MCP_HEADERS | {"Authorization": f"Bearer {tokens['eager']}"}
            ping = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {}}
            answers: list[httpx2.Response] = []

            async def send() -> None:
                answers.append(await raw.post(url, headers=headers, json=ping))

            async with anyio.create_task_group() as sending:
                for _ in range(40):
                    sending.start_soon(send)
            served = [answer for answer in answers if answer.status_code == 200]
            refused = [answer for answer in answers if answer.status_code == 429]
            assert len(served) + len(refused) == 40
            assert 15 <= len(served) <= 17  # the burst, 5 that waited, and what refilled meanwhile
            assert all(int(answer.headers["retry-after"]) >= 1 for answer in refused)
            assert "http_requests_per_second" in refused[0].json()["error"]["message"]
            with anyio.fail_after(SERVED_WITHIN_SECONDS):
                async with http_client(url, tokens["calm"]) as calm:
                    assert (await call(calm, "search_tasks", {}))["items"] == []
            # Served again once Retry-After has passed: polled, since a refused request takes nothing.
            with anyio.fail_after(int(refused[-1].headers["retry-after"]) + SERVED_WITHIN_SECONDS):
                while (await raw.post(url, headers=headers, json=ping)).status_code != 200:  # noqa: ASYNC110
                    await anyio.sleep(0.1)  # polling the server, with a deadline
            one_by_one = [(await raw.post(url, headers=headers, json=ping)).status_code for _ in range(20)]
            assert one_by_one == [200] * 20


async def test_idle_and_slow_connections_cannot_lock_real_agents_out(
    database_url: str, tmp_path: Path
) -> None:
    """600 idle TCP connections and 50 that send one byte at a time against a cap of 100: the idle
    ones are closed to make room (oldest first) and the slow ones when their header timeout runs
    out; an agent that connects meanwhile is served within its budget, and the process writes a
    bounded log. At the cap with every connection inside a request, a new one gets 503 at once."""
    entries, tokens = agents("worker")
    config = {
        "database_url": database_url,
        "agents": entries,
        "http_max_connections": 100,
        "http_header_timeout_seconds": 2,
        "http_body_timeout_seconds": 2,
        # Below: 100 requests that open sessions and wait for their bodies, all admitted.
        "http_max_sessions_per_agent": 200,
    }
    with http_server(tmp_path, config) as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(600)]
        slow = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(50)]
        for stream in slow:
            await stream.send(b"P")  # the start of a request head, and no more
        with anyio.fail_after(SERVED_WITHIN_SECONDS):
            async with http_client(url, tokens["worker"]) as worker:
                assert (await call(worker, "search_tasks", {}))["items"] == []
        closed = 0
        with anyio.fail_after(10):  # the slow ones' header timeout is 2 s
            for stream in [*idle, *slow]:
                try:
                    answer = await stream.receive()
                    assert answer.startswith(b"HTTP/1.1 408") and whole_response(answer), answer[:40]
                    closed += 1
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    closed += 1
                await stream.aclose()
        assert closed == 650
        # Requests refused before their body came (no valid token), the body then sent slowly:
        # each connection is closed 2 s after its 401 and makes way meanwhile, so an agent is served.
        dribbling = [await unfinished_post(port, "nope") for _ in range(120)]
        with anyio.fail_after(SERVED_WITHIN_SECONDS):
            async with http_client(url, tokens["worker"]) as worker:
                assert (await call(worker, "search_tasks", {}))["items"] == []
        for stream in dribbling:
            await stream.aclose()
        # Requests being served, their bodies still coming, fill the cap: the next connection gets
        # 503 at once.
        busy = [await unfinished_post(port, tokens["worker"]) for _ in range(100)]
        extra = await anyio.connect_tcp("127.0.0.1", port)
        with anyio.fail_after(SERVED_WITHIN_SECONDS):
            refused = await extra.receive()
        assert refused.startswith(b"HTTP/1.1 503") and b"retry-after: 5" in refused.lower()
        assert whole_response(refused)
        for stream in [*busy, extra]:
            await stream.aclose()
    log = await anyio.Path(tmp_path / f"server-{port}.log").read_text()
    assert len(log.splitlines()) < 500, log[-2000:]  # not a line or more for each of 870 connections


def test_a_session_counts_until_it_ends_or_has_been_idle_as_long_as_the_sdk_keeps_it() -> None:
    """The session count follows the SDK's clock: a session is open until its DELETE, a 404, or
    http_session_idle_seconds without a request in flight; Retry-After says when one will end.
    Another agent's request cannot end someone else's session."""
    now = [0.0]
    sessions = Sessions(per_agent=2, total=10, idle_seconds=60, clock=lambda: now[0])
    for session_id in ("s1", "s2"):
        assert sessions.admit("a") is None
        sessions.opened("a", session_id)
    refused = sessions.admit("a")
    assert refused is not None and refused[0] == 429 and refused[2] == 60
    now[0] = 30
    sessions.begin("s1", "a")  # s1 in use from 30 s on, for as long as it takes
    sessions.end("s2", "b", gone=True)  # another agent's DELETE of s2: the SDK answers it 404
    now[0] = 59
    refused = sessions.admit("a")
    assert refused is not None and refused[2] == 1  # s2 is idle 60 s at 60 s
    now[0] = 61
    assert sessions.admit("a") is None  # s2 ended idle; s1 is in flight and never does
    sessions.opened("a", None)  # that opening failed: its place is free again
    now[0] = 500
    assert sessions.admit("a") is None
    sessions.opened("a", "s3")
    refused = sessions.admit("a")
    assert refused is not None and refused[2] == 60  # s1 in flight, s3 just opened
    sessions.end("s1", "a", gone=True)
    assert sessions.admit("a") is None
