"""The stdio transport, served on the event loop instead of threads.

The SDK reads stdin and writes stdout through worker threads: the reader cannot be interrupted,
so a server told to stop would wait for the client's next line, and every response pays two
thread hand-offs (write, flush) on its way out. These streams wait on the descriptors instead.

`serve` is the SDK's `stdio_server` on these streams, but for one thing: the SDK drops a line it
cannot read as a JSON-RPC message, and a client that sent a request in it waits for an answer
that never comes (a lone surrogate, nesting too deep for its parser, a wrong `jsonrpc`, a
malformed id or params). Here every such request that carries an id gets its error: -32700 when
the line is not JSON, -32600 when it is no valid request (`id` null when its id is not a string
or an integer, as JSON-RPC 2.0 says), -32602 when only its params are wrong. Lines without an id
(notifications, stray responses) get no answer, as the protocol has it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import selectors
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from mcp import types
from mcp.shared._context_streams import create_context_streams
from mcp.shared.message import SessionMessage

logger = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602


def pollable(fd: int) -> bool:
    """A pipe, socket or terminal, which the event loop can wait on. A regular file it cannot, nor
    /dev/null (a service manager's stdin): a character device like a terminal, but one epoll
    refuses, so the selector is asked."""
    if sys.platform == "win32":
        return False
    try:
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError):
        return False
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
        return False
    with selectors.DefaultSelector() as selector:
        try:
            selector.register(fd, selectors.EVENT_READ)
        except OSError:
            return False
    return True


def is_pipe(fd: int) -> bool:
    """A pipe or socket: its open file is the client's and ours alone, unlike a terminal's, which
    the shell shares, so switching it to non-blocking mode disturbs nobody else."""
    try:
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class StdinLines:
    """stdin as lines; `close` ends the iteration at once, even while waiting for a line."""

    def __init__(self) -> None:
        self._fd = sys.stdin.fileno()
        os.set_blocking(self._fd, False)
        self._buffer = bytearray()
        self._closed = False
        self._waiting: anyio.CancelScope | None = None

    def restore(self) -> None:
        """Hand stdin back in blocking mode: the flag is shared with whoever else holds it (a shell)."""
        with contextlib.suppress(OSError):
            os.set_blocking(self._fd, True)

    def close(self) -> None:
        self._closed = True
        if self._waiting is not None:
            self._waiting.cancel()

    def __aiter__(self) -> StdinLines:
        return self

    async def __anext__(self) -> str:
        while (end := self._buffer.find(b"\n")) < 0:
            with anyio.CancelScope() as self._waiting:
                await anyio.wait_readable(self._fd)
            if self._closed:
                raise StopAsyncIteration
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                if not self._buffer:
                    raise StopAsyncIteration
                end = len(self._buffer)
                self._buffer.extend(b"\n")
                break
            self._buffer.extend(chunk)
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line.decode("utf-8", errors="replace")


class StdoutPipe:
    """The protocol's stdout, written from the event loop.

    Like the SDK, it keeps the wire on a private descriptor and points fd 1 at stderr while
    serving, so a stray print from a library lands in the log instead of corrupting a message.
    A client slow to read makes a write wait on the loop, never block it.
    """

    def __init__(self) -> None:
        self._fd = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
        os.dup2(2, 1)
        os.set_blocking(self._fd, False)

    def restore(self) -> None:
        with contextlib.suppress(OSError):
            os.set_blocking(self._fd, True)
            os.dup2(self._fd, 1)
            os.close(self._fd)

    async def write(self, text: str) -> None:
        """Write a frame whole; the SDK's one writer task writes one frame at a time."""
        data = memoryview(text.encode("utf-8"))
        while data:
            try:
                data = data[os.write(self._fd, data) :]
            except BlockingIOError:
                await anyio.wait_writable(self._fd)

    async def flush(self) -> None:
        """Every write goes straight to the descriptor; nothing is buffered."""


def unreadable_reply(line: str, problem: Exception) -> str | None:
    """The error answer to a line the SDK cannot read as a message: for a request, the JSON-RPC
    error that says why; for anything without an id (a notification, a response), None."""
    try:
        sent = json.loads(line)
    except (ValueError, RecursionError):
        return _error(None, PARSE_ERROR, "parse error: the line is not JSON")
    if not isinstance(sent, dict):
        return _error(None, INVALID_REQUEST, "invalid request: a request is a JSON object")
    if "id" not in sent or "method" not in sent:
        return None  # a notification or a response: nothing to answer
    given = sent["id"]
    request_id = given if isinstance(given, str | int) and not isinstance(given, bool) else None
    if request_id is None:
        return _error(None, INVALID_REQUEST, "invalid request: its id must be a string or an integer")
    if sent.get("jsonrpc") != "2.0":
        return _error(request_id, INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
    if not isinstance(sent["method"], str):
        return _error(request_id, INVALID_REQUEST, "invalid request: its method must be a string")
    if "params" in sent and not isinstance(sent["params"], dict | list | None):
        return _error(request_id, INVALID_REQUEST, "invalid request: params must be an object")
    text = str(problem).lower()
    if "recursion" in text or "depth" in text:
        return _error(request_id, INVALID_REQUEST, "invalid request: it is nested too deeply")
    if "invalid json" in text:  # JSON to Python's reader, not to the protocol's
        return _error(
            request_id,
            PARSE_ERROR,
            "parse error: the line holds what is not JSON text (a lone surrogate such as \\ud800, "
            "NaN or Infinity)",
        )
    return _error(request_id, INVALID_PARAMS, "invalid params: they do not fit the method")


def unanswerable(line: str, message: types.JSONRPCMessage) -> str | None:
    """A line read as a notification that carries an id all the same (a boolean or a fraction, no
    request id): its error, since its sender waits for an answer; None for a true notification."""
    if not isinstance(message, types.JSONRPCNotification):
        return None
    try:
        sent = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(sent, dict) or "id" not in sent:
        return None
    return _error(None, INVALID_REQUEST, "invalid request: its id must be a string or an integer")


def _error(request_id: str | int | None, code: int, message: str) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}})


@asynccontextmanager
async def serve(stdin: StdinLines, stdout: StdoutPipe) -> AsyncIterator[tuple[Any, Any]]:
    """The SDK's stdio transport on these streams (its read and write streams), with an answer for
    every request it cannot read (`unreadable_reply`)."""
    read_stream_writer, read_stream = create_context_streams[SessionMessage | Exception](0)
    write_stream, write_stream_reader = create_context_streams[SessionMessage](0)
    writing = anyio.Lock()  # one frame at a time on stdout, from the writer and the reader

    async def write(frame: str) -> None:
        async with writing:
            await stdout.write(frame + "\n")

    async def stdin_reader() -> None:
        with contextlib.suppress(anyio.ClosedResourceError):
            async with read_stream_writer:
                async for line in stdin:
                    try:
                        message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
                    except Exception as exc:
                        reply = unreadable_reply(line, exc)
                        if reply is None:
                            await read_stream_writer.send(exc)  # as the SDK does: logged, unanswered
                        else:
                            logger.warning(
                                "answered a request that could not be read: %s",
                                json.loads(reply)["error"]["message"],
                            )
                            await write(reply)
                        continue
                    if (reply := unanswerable(line, message)) is not None:
                        await write(reply)
                        continue
                    await read_stream_writer.send(SessionMessage(message))

    async def stdout_writer() -> None:
        with contextlib.suppress(anyio.ClosedResourceError):
            async with write_stream_reader:
                async for session_message in write_stream_reader:
                    await write(session_message.message.model_dump_json(by_alias=True, exclude_unset=True))

    async with anyio.create_task_group() as group:
        group.start_soon(stdin_reader)
        group.start_soon(stdout_writer)
        yield read_stream, write_stream
