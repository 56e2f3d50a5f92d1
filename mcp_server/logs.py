"""Logs on stderr (stdout is the protocol on stdio), as text or as one JSON object per line.

Every record written while a tool call runs carries that call's tool, agent identity and request
id: the same request id its audit entries and its trace span carry, so one id finds all three.
The server's own records of a call are also held for the call (`held`), to be sent to its client
as MCP log notifications; the SQL log never is.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from opentelemetry import trace

from mcp_server.identity import Call

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The tool call the running task serves, for the formatters: set once per call by the server.
_current: contextvars.ContextVar[Call | None] = contextvars.ContextVar("mcp_task_server_call", default=None)
# The records of the call the running task serves, held for its client (see `calling`).
_held: contextvars.ContextVar[list[logging.LogRecord] | None] = contextvars.ContextVar(
    "mcp_task_server_held", default=None
)
SERVER_LOGGER = "mcp_server"
NOT_FOR_CLIENTS = ("mcp_server.sql",)  # statements and their values stay in the server's log
MOST_HELD = 50


@contextmanager
def calling(call: Call) -> Iterator[list[logging.LogRecord]]:
    """Within this block, log records carry `call`'s tool, agent and request id; the server's own
    records (not the SQL log), at most MOST_HELD, are held in the list it gives."""
    held: list[logging.LogRecord] = []
    token, held_token = _current.set(call), _held.set(held)
    try:
        yield held
    finally:
        _current.reset(token)
        _held.reset(held_token)


class _Holder(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        held = _held.get()
        if held is not None and len(held) < MOST_HELD and not record.name.startswith(NOT_FOR_CLIENTS):
            held.append(record)


logging.getLogger(SERVER_LOGGER).addHandler(_Holder())


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        call = _current.get()
        if call is None:
            return text
        head, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{head} [tool={call.tool} agent={call.agent_id} request_id={call.request_id}]{newline}{rest}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (call := _current.get()) is not None:
            entry |= {"tool": call.tool, "agent_id": call.agent_id, "request_id": call.request_id}
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry |= {"trace_id": format(span.trace_id, "032x"), "span_id": format(span.span_id, "016x")}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class RateLimited(logging.Handler):
    """`inner`, but a record written `burst` times already in the current `window` of seconds
    (same logger, level and message) is counted instead of written. Once its window has passed, at
    the next record written (whichever it is), a line says how many were left out and of what. So
    a flood of one error (a client hammering a full server, "Too many open files") cannot fill the
    disk or pin a core writing it, and the log still says it happened. DEBUG records, asked for
    explicitly, are all written."""

    def __init__(self, inner: logging.Handler, burst: int = 20, window: float = 10.0) -> None:
        super().__init__()
        self.inner, self.burst, self.window = inner, burst, window
        self._seen: dict[tuple[str, int, str], _Window] = {}
        self._next_sweep = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        now = record.created
        if now >= self._next_sweep:
            self._sweep(now)
        if record.levelno <= logging.DEBUG:
            self.inner.handle(record)
            return
        key = (record.name, record.levelno, _kind(record))
        seen = self._seen.get(key)
        if seen is None:
            if len(self._seen) >= MOST_KINDS:  # that many different records in one window
                self._sweep(now, everything=True)
            self._seen[key] = _Window(now, 1, record.name, (record.pathname, record.lineno), key[2])
            self.inner.handle(record)
        elif seen.written < self.burst:
            seen.written += 1
            self.inner.handle(record)
        else:
            seen.left_out += 1

    def _sweep(self, now: float, everything: bool = False) -> None:
        """Close the windows that have passed, each with a line if it left records out."""
        self._next_sweep = now + 1
        for key, seen in list(self._seen.items()):
            if everything or now - seen.began >= self.window:
                del self._seen[key]
                if seen.left_out:
                    self.inner.handle(seen.summary(self.burst, self.window))


def _kind(record: logging.LogRecord) -> str:
    """What makes two records the same: their message; for uvicorn's access line of a refused
    request, the request and its status without the client's address, which differs with every
    new connection (a flood of bad tokens would otherwise be written in full)."""
    args = record.args
    if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
        status = args[4]
        if isinstance(status, int) and status >= 400:
            return f'"{args[1]} {args[2]} HTTP/{args[3]}" {status}'
    return record.getMessage()


@dataclass
class _Window:
    """One kind of record in its window: when it began, how many were written and left out, and
    where the first came from (not the record itself, which may hold a traceback's frames)."""

    began: float
    written: int
    name: str
    where: tuple[str, int]
    message: str
    left_out: int = 0

    def summary(self, burst: int, window: float) -> logging.LogRecord:
        return logging.LogRecord(
            self.name,
            logging.WARNING,
            *self.where,
            "%d more records like this were left out of the log (more than %d in %g s): %s",
            (self.left_out, burst, window, self.message[:500]),
            None,
        )


MOST_KINDS = 1000


def configure(level: str, format: str) -> None:
    """Send every log record to stderr, in `format` ("text" or "json"), from `level` up, with
    floods of one record rate-limited."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if format == "json" else _TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [RateLimited(handler)]
    root.setLevel(level)
    logging.captureWarnings(True)  # Python's warnings too, in the same format, not as bare lines
