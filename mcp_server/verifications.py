"""Limits on verify_audit_log, which reads the whole audit log (seconds on millions of entries):
one verification at a time in a server process (a second waits its turn), and one per agent per
`verify_interval_seconds`; a call sooner is refused, saying when to retry, and recorded as a
refusal (permission `verify_interval`). So no agent, however limited otherwise, can keep the
database reading the log over and over while others write.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from mcp_server.errors import PermissionDeniedError

PERMISSION = "verify_interval"
MAX_REMEMBERED = 10_000


class Verifications:
    def __init__(self, interval_seconds: float) -> None:
        self._interval = interval_seconds
        self._running = anyio.Lock()
        self._started: dict[str, float] = {}  # agent -> when its last verification began (monotonic)

    @asynccontextmanager
    async def turn(self, agent_id: str) -> AsyncIterator[None]:
        """The agent's turn to verify, or a refusal when its last one began too recently."""
        now = time.monotonic()
        last = self._started.get(agent_id)
        if last is not None and now - last < self._interval:
            wait = math.ceil(self._interval - (now - last))
            raise PermissionDeniedError(
                PERMISSION,
                f"verify_audit_log runs at most once every {self._interval:g} s for each agent, and yours "
                f"ran {now - last:.0f} s ago (permission {PERMISSION}); retry in {wait} s",
            )
        if len(self._started) >= MAX_REMEMBERED:
            self._started = {a: t for a, t in self._started.items() if now - t < self._interval}
        self._started[agent_id] = now
        async with self._running:
            yield
