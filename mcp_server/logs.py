"""Logs on stderr (stdout is the protocol on stdio), as text or as one JSON object per line.

Every record written while a tool call runs carries that call's tool, agent identity and request
id: the same request id its audit entries and its trace span carry, so one id finds all three.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from opentelemetry import trace

from mcp_server.identity import Call

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The tool call the running task serves, for the formatters: set once per call by the server.
_current: contextvars.ContextVar[Call | None] = contextvars.ContextVar("mcp_task_server_call", default=None)


@contextmanager
def calling(call: Call) -> Iterator[None]:
    """Within this block, log records carry `call`'s tool, agent and request id."""
    token = _current.set(call)
    try:
        yield
    finally:
        _current.reset(token)


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


def configure(level: str, format: str) -> None:
    """Send every log record to stderr, in `format` ("text" or "json"), from `level` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if format == "json" else _TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
