"""What any client may hold of an HTTP server process before it has proved anything: connections,
and the time it takes to send a request. uvicorn's h11 protocol, with these added:

- A cap on open connections (`http_max_connections`). At the cap, a new connection takes the
  place of the one that has waited longest without sending a complete request head (an idle
  flood churns among itself, and an agent that connects and sends its request at once is
  served); when every connection is busy with a request, the new one gets an immediate 503 with
  `Retry-After` and is closed. uvicorn's own `limit_concurrency` counts idle connections but
  never closes them, so 2,000 idle connections locked every agent out.
- A header timeout (`http_header_timeout_seconds`): a connection that has not sent a complete
  request head this long after connecting, or after its last response, is closed (with a 408
  when it sent part of one). uvicorn has none: a connection sending one byte a second stayed
  open for hours.
- A body timeout (`http_body_timeout_seconds`): a request whose body has not all arrived this
  long after its head is cut off (408 when no response has started). A request answered before
  its body came (a 401 without a valid token) has the rest of its body read and dropped; if that
  takes longer than `LINGER_SECONDS` the connection is closed, and meanwhile it makes way for a
  new connection like an idle one.

The open-file limit is raised to its hard limit at start, and the cap kept below it with room for
what the process opens itself and for a burst the loop accepts before it can close the surplus, so
the process never runs out of file descriptors ("Too many open files", which on asyncio's loop
is logged thousands of times a second).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from mcp_server.errors import StartupError

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


def _answer(status: str, body: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, written straight to the transport."""
    lines = [f"HTTP/1.1 {status}", "content-type: text/plain; charset=utf-8", f"content-length: {len(body)}"]
    return "\r\n".join([*lines, *headers, "connection: close", "", body]).encode()


FULL = _answer(
    "503 Service Unavailable",
    "this server is serving as many connections as it may; retry",
    f"retry-after: {RETRY_AFTER_SECONDS}",
)
TOO_SLOW = _answer("408 Request Timeout", "the request did not arrive in time")
# File descriptors the process keeps for itself: the listener, the loop, the database pool, logs.
SPARE_FDS = 200
# The loop accepts up to `backlog` connections at once before any of them can be closed again:
# room for a few such bursts beyond the cap. uvicorn's default backlog, and the least it is cut to.
MOST_BACKLOG = 2048
LEAST_BACKLOG = 64
ACCEPT_BURSTS = 4
# How long the rest of a body answered before it came may take before its connection is closed.
LINGER_SECONDS = 2.0


def plan(max_connections: int) -> tuple[int, int]:
    """Raise the open-file limit as far as allowed; the connection cap and the listen backlog it
    leaves room for."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    room = soft - SPARE_FDS
    backlog = max(LEAST_BACKLOG, min(MOST_BACKLOG, (room - max_connections) // ACCEPT_BURSTS))
    cap = min(max_connections, room - ACCEPT_BURSTS * backlog)
    if cap < 1:
        raise StartupError(
            f"the open-file limit ({soft}) leaves no room for HTTP connections; raise it (ulimit -n) "
            f"to at least {SPARE_FDS + ACCEPT_BURSTS * LEAST_BACKLOG + max_connections}"
        )
    if cap < max_connections:
        logger.warning(
            "serving at most %d connections, not http_max_connections=%d: the open-file limit is %d",
            cap,
            max_connections,
            soft,
        )
    return cap, backlog


def limited_protocol(cap: int, header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the cap and timeouts, for `uvicorn.Config(http=...)`."""
    # Connections still to send a complete request head, oldest first (a dict keeps insertion order).
    waiting: dict[LimitedH11Protocol, None] = {}

    class LimitedH11Protocol(H11Protocol):
        _refused = False
        _sent_some = False
        _timer: asyncio.TimerHandle | None = None
        _phase = ""  # "head", "body", "app" (the request is read), "linger" (answered early), "gone"

        def connection_made(self, transport: Any) -> None:
            if len(self.connections) >= cap and not _make_room():
                self._refused = True
                transport.write(FULL)
                transport.close()  # after the 503 is written; never one of server_state.connections
                logger.warning("refused a connection: %d are open, as many as are served", cap)
                return
            super().connection_made(transport)
            self._begin("head")

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            self._sent_some = True
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start the next request of a pipeline
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.SEND_BODY:
                # Answered before its body came (a 401, a 429): the rest of the body is read and
                # dropped, and the connection serves its next request, if the body comes soon;
                # else it is closed, and meanwhile it makes way for a new connection. A client
                # with no token could otherwise hold it by sending its body slowly.
                self._begin("linger")
                return
            if self.conn.their_state is h11.IDLE:
                self._begin("head")  # the clock of the next request head starts now
            self._follow()

        def connection_lost(self, exc: Exception | None) -> None:
            self._begin("gone")
            if not self._refused:
                super().connection_lost(exc)

        def _begin(self, phase: str) -> None:
            if self._timer is not None:
                self._timer.cancel()
            waiting.pop(self, None)
            self._phase, self._sent_some, self._timer = phase, False, None
            if phase in ("head", "linger"):
                waiting[self] = None  # one of these makes way for a new connection
                delay = header_timeout if phase == "head" else LINGER_SECONDS
                self._timer = self.loop.call_later(delay, self._expired)
            elif phase == "body":
                self._timer = self.loop.call_later(body_timeout, self._expired)

        def _follow(self) -> None:
            """The phase the parser says the request is in."""
            state = self.conn.their_state
            if state is h11.IDLE:
                if self._phase != "head" and not self.transport.is_closing():
                    self._begin("head")
            elif state is h11.SEND_BODY:
                if self._phase not in ("body", "linger"):
                    self._begin("body")
            elif self._phase != "app":
                self._begin("app")

        def _expired(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self._phase == "linger":
                self._close()
                return
            if self._phase == "body" and self.flow.read_paused:  # the app is slow to read, not the client
                self._timer = self.loop.call_later(body_timeout, self._expired)
                return
            logger.info("closed a connection that did not send its request in time (%s)", self._phase)
            if self._phase == "head" and self._sent_some:
                self.transport.write(TOO_SLOW)
            elif self._phase == "body" and self.cycle is not None and not self.cycle.response_started:
                # The app's next receive() gets http.disconnect and its send() does nothing.
                self.cycle.response_started = self.cycle.disconnected = True
                self.cycle.message_event.set()
                self.transport.write(TOO_SLOW)
            self._close()

        def _close(self) -> None:
            self._begin("gone")
            self.transport.close()

    def _make_room() -> bool:
        """Close the connection that has waited longest for its request head, if any."""
        if not waiting:
            return False
        oldest = next(iter(waiting))
        oldest._close()
        return True

    return LimitedH11Protocol
