"""What one agent may take of an HTTP server process: requests per second, and open sessions.

An ASGI middleware inside authentication, so it knows the agent a verified token proves; a request
without one goes on to be refused by authentication. Over a limit the answer is fast and says
when to come back: 429 with `Retry-After` for the agent's own limits, 503 with `Retry-After`
when the process holds as many sessions as it may (`http_max_sessions`).

- Requests: a token bucket per agent, `http_requests_per_second` refilled each second and up to
  twice that saved for a burst. Beyond it a request waits its turn for up to a second, and is
  refused only past that. A DELETE, which ends a session, is never held back.
- Sessions (stateful HTTP, the handshake eras): the SDK ends a session after
  `http_session_idle_seconds` without a request, or at a DELETE it carries out; the same clock
  here counts an agent's sessions as open until then, from the moment the answer that opens one
  starts. At most `http_max_sessions_per_agent` per agent, so one agent, even a read-only one,
  cannot take the sessions every other agent needs. Later eras have no sessions to count.

Both are per process: behind a load balancer over N processes, an agent gets up to N times as much.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_server.auth import AgentToken
from mcp_server.config import Settings

logger = logging.getLogger(__name__)

SESSION_HEADER = b"mcp-session-id"
PROTOCOL_VERSION_HEADER = MCP_PROTOCOL_VERSION_HEADER.lower().encode("ascii")
# A JSON-RPC error without a request id, as the SDK answers what it refuses before reading a request.
SERVER_ERROR = -32000
MOST_BUCKETS = 10_000  # full buckets are forgotten beyond this many agents
MOST_DELAY = 1.0  # seconds a request over the rate may wait its turn before it is refused instead


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RequestRates:
    """Per agent, a token bucket of requests. A request over the rate by less than `MOST_DELAY`
    waits its turn (a busy client is slowed, not failed: clients rarely honour Retry-After); one
    over it by more is refused, so what waits is bounded by the rate times that delay."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.burst = max(1.0, 2 * per_second)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, agent: str) -> tuple[bool, float]:
        """Take one request for `agent`: (True, seconds to wait first), or (False, seconds until
        one would be taken without being refused)."""
        now = self._clock()
        bucket = self._buckets.get(agent)
        if bucket is None:
            if len(self._buckets) >= MOST_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[agent] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.per_second)
        bucket.updated = now
        wait = max(0.0, (1 - bucket.tokens) / self.per_second)
        if wait > MOST_DELAY:
            return False, wait - MOST_DELAY
        bucket.tokens -= 1
        return True, wait

    def _forget_full(self, now: float) -> None:
        full = [
            agent
            for agent, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * self.per_second >= self.burst
        ]
        for agent in full:
            del self._buckets[agent]


@dataclass
class _Session:
    agent: str
    last_used: float
    in_flight: int = 0


@dataclass
class Sessions:
    """The sessions this process has opened, by agent, as the SDK keeps them: open until the
    client ends it or it has been idle `idle_seconds` with no request in flight."""

    per_agent: int
    total: int
    idle_seconds: float
    clock: Callable[[], float] = time.monotonic
    _open: dict[str, _Session] = field(default_factory=dict)
    _opening: dict[str, int] = field(default_factory=dict)  # per agent, admitted and not yet answered

    def admit(self, agent: str) -> tuple[int, str, float] | None:
        """Reserve a session for `agent`; None when admitted (then `opened`, with or without one), else
        (HTTP status, why, seconds until a session may end)."""
        now = self.clock()
        self._end_idle(now)
        mine = [session for session in self._open.values() if session.agent == agent]
        if len(mine) + self._opening.get(agent, 0) >= self.per_agent:
            return (
                429,
                f"agent {agent} already has {self.per_agent} open sessions (http_max_sessions_per_agent): "
                "end one it no longer uses with an HTTP DELETE, or keep using one it has",
                self._until_one_ends(mine, now),
            )
        if len(self._open) + sum(self._opening.values()) >= self.total:
            return (
                503,
                f"this server process has {self.total} open sessions, as many as it keeps "
                "(http_max_sessions): retry later, or reuse a session you have",
                self._until_one_ends(list(self._open.values()), now),
            )
        self._opening[agent] = self._opening.get(agent, 0) + 1
        return None

    def opened(self, agent: str, session_id: str | None) -> None:
        self._release(agent)
        if session_id is not None:
            self._open[session_id] = _Session(agent, self.clock())

    def begin(self, session_id: str, agent: str) -> None:
        if (session := self._open.get(session_id)) is not None and session.agent == agent:
            session.in_flight += 1

    def end(self, session_id: str, agent: str, *, gone: bool) -> None:
        """A request of the session was answered; `gone`: the session ended with it (DELETE, 404).
        Only its own agent's requests count (the SDK answers anyone else's with 404)."""
        session = self._open.get(session_id)
        if session is None or session.agent != agent:
            return
        if gone:
            del self._open[session_id]
            return
        session.in_flight -= 1
        session.last_used = self.clock()

    def _release(self, agent: str) -> None:
        left = self._opening.get(agent, 0) - 1
        if left > 0:
            self._opening[agent] = left
        else:
            self._opening.pop(agent, None)

    def _end_idle(self, now: float) -> None:
        idle = [
            session_id
            for session_id, session in self._open.items()
            if not session.in_flight and now - session.last_used >= self.idle_seconds
        ]
        for session_id in idle:
            del self._open[session_id]

    def _until_one_ends(self, sessions: list[_Session], now: float) -> float:
        idle = [session.last_used for session in sessions if not session.in_flight]
        return max(1.0, self.idle_seconds - (now - min(idle))) if idle else self.idle_seconds


class AgentLimits:
    """The ASGI middleware: refuses over the limits, and follows sessions as they open and end."""

    def __init__(self, app: ASGIApp, settings: Settings, path: str) -> None:
        self.app = app
        self.path = path
        per_second = settings.http_requests_per_second
        self.rates = RequestRates(per_second) if per_second > 0 else None
        self.sessions = (
            None
            if settings.http_stateless
            else Sessions(
                per_agent=settings.http_max_sessions_per_agent,
                total=settings.http_max_sessions,
                idle_seconds=settings.http_session_idle_seconds,
            )
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user")
        if (
            scope["type"] != "http"
            or scope["path"].rstrip("/") != self.path
            or not isinstance(user, AuthenticatedUser)
        ):
            await self.app(scope, receive, send)
            return
        token = user.access_token
        agent = token.agent_id if isinstance(token, AgentToken) else token.client_id
        # Ending a session frees what it holds: never held back.
        if self.rates is not None and scope["method"] != "DELETE":
            admitted, wait = self.rates.take(agent)
            if not admitted:
                why = (
                    f"agent {agent} sent more than {self.rates.per_second:g} requests a second "
                    "(http_requests_per_second): wait as Retry-After says, then retry"
                )
                await _refuse(send, 429, why, wait)
                return
            if wait:
                await anyio.sleep(wait)
        if self.sessions is None:
            await self.app(scope, receive, send)
            return
        session_id = _header(scope, SESSION_HEADER)
        if session_id is None and scope["method"] == "POST" and _may_open_a_session(scope):
            await self._opening(agent, self.sessions, scope, receive, send)
            return
        if session_id is None:
            await self.app(scope, receive, send)
            return
        self.sessions.begin(session_id, agent)
        status = 500
        try:
            status = await _answered(self.app, scope, receive, send)
        finally:
            # Gone when the SDK says so: a DELETE it carried out, or "no such session". A DELETE
            # it refused (a bad Origin, another protocol era) leaves the session open.
            gone = (scope["method"] == "DELETE" and status < 300) or status == 404
            self.sessions.end(session_id, agent, gone=gone)

    async def _opening(
        self, agent: str, sessions: Sessions, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if (refused := sessions.admit(agent)) is not None:
            status, why, wait = refused
            logger.warning("refused a new session: %s", why)
            await _refuse(send, status, why, wait)
            return
        settled = False

        async def watch(message: Message) -> None:
            nonlocal settled
            if message["type"] == "http.response.start" and not settled:
                # Counted before the client can read the id, so a DELETE sent the moment it does
                # finds the session here to end.
                settled = True
                ids = [
                    value.decode("latin-1") for name, value in message["headers"] if name == SESSION_HEADER
                ]
                sessions.opened(agent, ids[0] if ids and message["status"] < 400 else None)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if not settled:
                sessions.opened(agent, None)


async def _answered(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> int:
    """Run `app` for the request; the HTTP status it answered with."""
    status = 500

    async def watch(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    await app(scope, receive, watch)
    return status


def _may_open_a_session(scope: Scope) -> bool:
    """Whether the SDK would take this POST without a session id to its stateful path, where an
    `initialize` opens a session: no protocol version header, or a handshake era's. Later eras
    carry their version on every request and have no sessions."""
    version = _header(scope, PROTOCOL_VERSION_HEADER)
    return version is None or version in HANDSHAKE_PROTOCOL_VERSIONS


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _refuse(send: Send, status: int, why: str, wait: float) -> None:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": None, "error": {"code": SERVER_ERROR, "message": why}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(math.ceil(wait)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
