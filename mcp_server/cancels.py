"""Cancellation that arrives on a request of its own: stateless HTTP in the handshake era.

How a client cancels a call depends on the transport, and the SDK handles all but one case:
- over stdio and stateful HTTP, `notifications/cancelled` arrives on the call's own session, and
  the SDK cancels the handler;
- in the 2026-07-28 era a client cancels by closing the call's response stream, and the SDK
  cancels the handler when the stream goes;
- over stateless HTTP in the 2025-11-25 era, `notifications/cancelled` arrives as a POST of its
  own, served by a transport built for that POST alone. It knows nothing of the call, so the SDK
  accepts the notification and drops it, and the call would run on and commit.

For that last case the server keeps its sessionless calls here, by the agent that made them and
their JSON-RPC request id, and a middleware hands the notification to them. A verified agent can
cancel only its own calls. Two clients of one agent that have the same request id in flight at the
same moment are both cancelled: each sees a "cancelled, nothing was changed" error, never a
half-done change. A call on another server process is out of reach; behind a load balancer,
clients of the 2026-07-28 era cancel wherever their call runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.types import CancelledNotificationParams, RequestId
from pydantic import ValidationError

logger = logging.getLogger(__name__)

CANCELLED = "notifications/cancelled"

Key = tuple[str, RequestId]


class SessionlessCalls:
    """The calls in flight that arrived without a session, each with the scope that cancels it."""

    def __init__(self) -> None:
        self._running: dict[Key, list[anyio.CancelScope]] = {}

    @contextmanager
    def running(self, agent_id: str, request_id: RequestId) -> Iterator[anyio.CancelScope]:
        """Run the block as `agent_id`'s call `request_id`, until it ends or is cancelled; the
        scope says which (`cancelled_caught`)."""
        key = (agent_id, request_id)
        scope = anyio.CancelScope()
        self._running.setdefault(key, []).append(scope)
        try:
            with scope:
                yield scope
        finally:
            scopes = self._running[key]
            scopes.remove(scope)
            if not scopes:
                del self._running[key]

    def cancel(self, agent_id: str, request_id: RequestId) -> int:
        """Cancel `agent_id`'s calls under `request_id`; how many there were."""
        scopes = self._running.get((agent_id, request_id), [])
        for scope in scopes:
            scope.cancel()
        return len(scopes)


class CancelSessionless(ServerMiddleware[Any]):
    """Hands a `notifications/cancelled` that arrives without a session to the calls it names,
    then lets the SDK go on with it (it accepts and drops it)."""

    def __init__(self, calls: SessionlessCalls, agent_id: Callable[[], str]) -> None:
        self._calls = calls
        self._agent_id = agent_id  # the verified agent of the message being handled

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method == CANCELLED and ctx.request_id is None and ctx.request is not None:
            try:
                params = CancelledNotificationParams.model_validate(ctx.params or {})
            except ValidationError:
                params = None
            if params is not None and params.request_id is not None:
                agent_id = self._agent_id()
                if self._calls.cancel(agent_id, params.request_id):
                    logger.info("%s cancelled its call %r", agent_id, params.request_id)
        return await call_next(ctx)
