"""Limits on verify_audit_log, which can read the whole audit log (seconds on millions of entries):
one verification at a time in a server process (a second waits its turn), and one per agent per
`verify_interval_seconds`; a call sooner is refused, saying when to retry, and recorded as a
refusal (permission `verify_interval`). So no agent, however limited otherwise, can keep the
database reading the log over and over while others write.

And incremental: a verification walks on from where the last one in this process ended (its
position and hash, which must still be there), so it reads only what was sealed since. The first
in a process, and then one every `verify_full_interval_seconds`, walks the whole chain again,
which is what finds an older entry changed behind the triggers; the console and the CLI always do.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from mcp_server import chain
from mcp_server.errors import PermissionDeniedError

PERMISSION = "verify_interval"
MAX_REMEMBERED = 10_000


class Verifications:
    def __init__(self, interval_seconds: float, full_interval_seconds: float) -> None:
        self._interval = interval_seconds
        self._full_interval = full_interval_seconds
        self._running = anyio.Lock()
        self._started: dict[str, float] = {}  # agent -> when its last verification began (monotonic)
        self._verified: chain.Position | None = None  # where the last verification ended
        self._full_at: float | None = None  # when the last whole walk began

    @asynccontextmanager
    async def turn(self, agent_id: str) -> AsyncIterator[Turn]:
        """The agent's turn to verify, or a refusal when its last one began too recently: where to
        walk from, and what to record of the walk."""
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
            began = time.monotonic()
            whole = (
                self._verified is None
                or self._full_at is None
                or began - self._full_at >= self._full_interval
            )
            turn = Turn(None if whole else self._verified)
            yield turn
            if turn.report is not None and turn.report["ok"] and "head_seq" in turn.report:
                self._verified = chain.Position(turn.report["head_seq"], turn.report["head_hash"])
                self._full_at = began if whole else self._full_at
            elif turn.report is not None:
                self._verified = None  # a problem: the next walks the whole chain again


@dataclass
class Turn:
    """One verification: the position to walk on from (None: the whole chain), and its report."""

    start: chain.Position | None
    report: chain.ChainReport | None = None
