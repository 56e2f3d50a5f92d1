"""tools/call on stdio, answered by the server itself instead of the SDK's generic dispatcher.

The SDK serves every request through machinery built for every transport and protocol era: a
task and a middleware chain per request, the params validated twice, and the result dumped,
validated and dumped again before its frame is written. For the one request an agent sends over
and over, that costs about 0.5 ms a call, more than most calls spend in the database (bench/).
So on a stdio session opened with `initialize` at protocol 2025-11-25, this module answers
tools/call itself: the same tools (argument models, permission guard, data functions), the
same result and error frames, and one serialization. Every other message, and any tools/call
it is not sure of (another protocol version, a progress token, odd params), goes to the SDK
untouched. Calls run concurrently, as the SDK runs them; `notifications/cancelled` cancels one
(its transaction rolls back and it is never answered); when stdin closes, calls still running
are cancelled and answered "Connection closed", as the SDK answers them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.types import CallToolResult, InitializeRequestParams, TextContent
from pydantic import ValidationError
from pydantic_core import from_json, to_json

from mcp_server.server import AppState, TaskServer

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = "2025-11-25"  # the version whose frames this module writes, as the SDK writes them
CONNECTION_CLOSED = -32000  # the SDK's code for a request cut off by the end of the connection

_MARKERS = ('"tools/call"', '"initialize"', '"notifications/initialized"', '"notifications/cancelled"')


@dataclass(frozen=True)
class _RequestContext:
    lifespan_context: AppState


@dataclass(frozen=True)
class _Session:
    client_params: InitializeRequestParams


@dataclass(frozen=True)
class CallContext:
    """What the tools read of the SDK's `Context` (server._state, identity.principal): the state
    the lifespan opened, and the session's initialize parameters."""

    request_context: _RequestContext
    session: _Session

    async def report_progress(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Nothing to report to: a call that asks for progress goes to the SDK, which sends it."""


@dataclass
class _Running:
    task: asyncio.Task[None]
    started: bool = False  # a task cancelled before it starts never runs a line of its own
    cancelled: bool = False
    closing: bool = False  # cancelled because stdin closed, rather than by the client
    writing: bool = False  # its answer is going out: too late to cancel, and never to be cut short


class DirectCalls:
    """Sits between stdin and the SDK: serves the tools/call lines it can, passes on the rest.

    A call runs in an asyncio task of its own, as the SDK runs each request; a bare task rather
    than one in an anyio task group, whose bookkeeping costs about 20 us a call.
    """

    def __init__(self, server: TaskServer, write: Callable[[str], Awaitable[None]]) -> None:
        self._server = server
        self._write = write
        self._initialize: InitializeRequestParams | None = None
        self._ready = False
        self._running: dict[int | str, _Running] = {}
        self._idle = asyncio.Event()

    async def lines(self, source: AsyncIterable[str]) -> AsyncIterator[str]:
        """The lines of `source` the SDK is to handle. When `source` ends, the calls still running
        are cancelled and answered before the SDK hears of the end."""
        async for line in source:
            if not any(marker in line for marker in _MARKERS) or not self._take(line):
                yield line
        for call in self._running.values():
            call.closing = True
            self._cancel(call)
        while self._running:
            await self._idle.wait()

    def _take(self, line: str) -> bool:
        """Serve or note `line`; False when the SDK is to handle it."""
        try:
            message = from_json(line)
        except ValueError:
            return False
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return False
        method: Any = message.get("method")
        params: Any = message.get("params")
        id: Any = message.get("id")
        if method == "initialize" and self._initialize is None:
            self._note_initialize(params)
        elif method == "notifications/initialized" and self._initialize is not None:
            self._ready = True
        elif method == "notifications/cancelled" and isinstance(params, dict):
            request: Any = params.get("requestId")
            call = self._running.get(request)
            if call is not None:
                self._cancel(call)
                return True
        elif method == "tools/call" and self._ready and self._servable(id, params):
            task = asyncio.get_running_loop().create_task(
                self._serve(id, params["name"], params.get("arguments") or {})
            )
            self._running[id] = _Running(task)
            return True
        return False

    @staticmethod
    def _cancel(call: _Running) -> None:
        call.cancelled = True
        if call.started and not call.writing:
            call.task.cancel()

    def _note_initialize(self, params: Any) -> None:
        if not isinstance(params, dict) or params.get("protocolVersion") != PROTOCOL_VERSION:
            return
        try:
            self._initialize = InitializeRequestParams.model_validate(params, by_name=False)
        except ValidationError:
            return

    def _servable(self, id: Any, params: Any) -> bool:
        if isinstance(id, bool) or not isinstance(id, int | str) or id in self._running:
            return False
        if not isinstance(params, dict) or set(params) - {"name", "arguments", "_meta"}:
            return False
        meta, arguments = params.get("_meta"), params.get("arguments")
        if meta is not None and (not isinstance(meta, dict) or "progressToken" in meta):
            return False  # a progress token asks for notifications: the SDK sends them
        if self._server.app_state is None:
            return False  # the lifespan has not opened the database yet: the SDK queues the call
        return params.get("name") in self._server.direct_tools and isinstance(arguments, dict | None)

    async def _serve(self, id: int | str, name: str, arguments: dict[str, Any]) -> None:
        call = self._running[id]
        call.started = True
        try:
            try:
                if call.cancelled:
                    raise asyncio.CancelledError
                result = await self._call(name, arguments)
                # Keys in the order the SDK writes them, so that the frames are the SDK's to the byte.
                frame = f'{{"jsonrpc":"2.0","id":{to_json(id).decode()},"result":{result}}}'
            except asyncio.CancelledError:
                if not call.cancelled:
                    raise  # not by this module: the event loop is shutting down
                if not call.closing:
                    return  # cancelled by the client: never answered
                error = {"code": CONNECTION_CLOSED, "message": "Connection closed"}
                frame = to_json({"jsonrpc": "2.0", "id": id, "error": error}).decode()
            call.writing = True
            await self._write(frame + "\n")
        except OSError as exc:
            logger.warning("could not answer call %r: %s", id, exc)
        finally:
            del self._running[id]
            if not self._running:
                self._idle.set()
                self._idle = asyncio.Event()

    async def _call(self, name: str, arguments: dict[str, Any]) -> str:
        """The call's result as JSON, as the SDK's tools/call handler would give it."""
        tool: Tool = self._server.direct_tools[name]
        try:
            validated = tool.fn_metadata.validate_arguments(arguments)
        except ValidationError as exc:
            logger.info("Tool %r rejected arguments: %r", name, sorted({str(e["loc"]) for e in exc.errors()}))
            return _error_result(f"Error executing tool {name}: {exc}")
        state = self._server.app_state
        assert state is not None and self._initialize is not None, "see _servable"
        try:
            result: CallToolResult = await tool.fn(
                ctx=CallContext(_RequestContext(state), _Session(self._initialize)), **validated
            )
        except ToolError as exc:
            logger.info("Tool %r failed: %r", name, str(exc))
            return _error_result(f"Error executing tool {name}: {exc}")
        except Exception:
            logger.exception("Tool %r raised an unexpected exception", name)
            return _error_result(f"Error executing tool {name}")
        text = result.content[0]
        assert isinstance(text, TextContent) and result.structured_content is not None
        # The text is the structured content as JSON (server._result): written once, used twice.
        content = to_json([{"text": text.text, "type": "text"}]).decode()
        return f'{{"content":{content},"isError":false,"structuredContent":{text.text}}}'


def _error_result(text: str) -> str:
    return to_json({"content": [{"text": text, "type": "text"}], "isError": True}).decode()
