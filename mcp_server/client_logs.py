"""MCP log notifications: a client hears the server's own log records of its own calls.

What a call logs (a refusal, a cancellation, a database failure; never the SQL log, see logs.py)
is sent to the client that made the call as `notifications/message`, before the call's answer.
In the handshake era a session chooses the least level it hears with `logging/setLevel`
(`warning` until it does); in the 2026-07-28 era a request asks for its level in its `_meta`, and
the SDK sends nothing to a request that did not. Nothing of another agent's calls is ever sent.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Sequence
from typing import Any

import anyio
from mcp.server.connection import allowed_log_levels
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError
from mcp.types import (
    EmptyResult,
    LoggingLevel,
    LoggingMessageNotification,
    LoggingMessageNotificationParams,
    SetLevelRequestParams,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

SET_LEVEL = "logging/setLevel"
ORDER: tuple[LoggingLevel, ...] = (
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
)
UNTIL_SET: LoggingLevel = "warning"


def level_of(record: logging.LogRecord) -> LoggingLevel:
    if record.levelno >= logging.CRITICAL:
        return "critical"
    if record.levelno >= logging.ERROR:
        return "error"
    if record.levelno >= logging.WARNING:
        return "warning"
    return "info" if record.levelno >= logging.INFO else "debug"


class SessionLevels:
    """The least level each handshake-era session asked to hear."""

    def __init__(self) -> None:
        self._levels: weakref.WeakKeyDictionary[Any, LoggingLevel] = weakref.WeakKeyDictionary()

    async def set_level(
        self, ctx: ServerRequestContext[Any, Any], params: SetLevelRequestParams
    ) -> EmptyResult:
        self._levels[connection_of(ctx)] = params.level
        return EmptyResult()

    def least(self, ctx: Context[Any, Any]) -> LoggingLevel:
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return ORDER[0]  # the request's _meta decides, and the SDK applies it
        return self._levels.get(connection_of(ctx.request_context), UNTIL_SET)


def connection_of(ctx: ServerRequestContext[Any, Any]) -> Any:
    """What a handshake-era session's messages share: the SDK makes a `ServerSession` per message
    around the client's one `Connection`, which it keeps private; the session itself otherwise.
    (Also how changes.py knows a subscriber.)"""
    return getattr(ctx.session, "_connection", ctx.session)


async def send(ctx: Context[Any, Any], records: Sequence[logging.LogRecord], least: LoggingLevel) -> None:
    """Send `records` at `least` or above to the client of the call `ctx` serves, on the call's
    own channel; a client that is gone misses them, and the call's answer is not held up by it.
    (The SDK's `Context.log` does the same but warns, as the feature leaves the 2026 era.)"""
    request = ctx.request_context
    allowed = allowed_log_levels(ctx.protocol_version or "", request.meta)  # the 2026 era's opt-in
    floor = ORDER.index(least)
    for record in records:
        level = level_of(record)
        if level not in allowed or ORDER.index(level) < floor:
            continue
        message = LoggingMessageNotification(
            params=LoggingMessageNotificationParams(level=level, data=record.getMessage(), logger=record.name)
        )
        with contextlib.suppress(MCPError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            await request.session.send_notification(message, related_request_id=ctx.request_id)
