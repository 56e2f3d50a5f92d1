"""Refused calls on the record without a flood: per agent, tool and missing permission, the first
refusal in a window of time is an audit entry (`refused`), and the repeats within the window are
counted in one row (`refusal_tally`); the first refusal of a later window is an entry again, and
carries how many repeats the previous window had (`repeated_before`). So a limited agent retrying
what it may not do in a loop writes one entry a window, not one a call, and nothing it does grows
the audit log or its chain faster than that.

The row is locked while it is counted, so two processes refusing the same key at once count both.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import audit
from mcp_server.identity import Call
from mcp_server.models import RefusalTally, utcnow

NEVER = datetime(1970, 1, 1, tzinfo=UTC)
MAX_KEY = 200


@dataclass(frozen=True)
class Recorded:
    """How a refusal went on the record: as an entry, or counted as the `repeats`-th repeat of the
    window's entry."""

    entry: bool
    repeats: int = 0


async def record(
    session: AsyncSession, call: Call, permission: str, arguments: Any, window: timedelta
) -> Recorded:
    now = utcnow()
    start = datetime.fromtimestamp(
        int(now.timestamp()) // int(window.total_seconds()) * int(window.total_seconds()), UTC
    )
    key = {"agent_id": call.agent_id[:MAX_KEY], "tool": call.tool[:100], "permission": permission[:MAX_KEY]}
    dialect = session.get_bind().dialect.name
    first = (pg_insert if dialect == "postgresql" else sqlite_insert)(RefusalTally)
    await session.exec(first.values(**key, window_start=NEVER, repeats=0).on_conflict_do_nothing())
    tally = await session.get(
        RefusalTally,
        (key["agent_id"], key["tool"], key["permission"]),
        with_for_update=True,
        populate_existing=True,
    )
    assert tally is not None
    if tally.window_start == start:
        tally.repeats += 1
        return Recorded(entry=False, repeats=tally.repeats)
    before = tally.repeats if tally.window_start != NEVER else 0
    tally.window_start, tally.repeats = start, 0
    audit.record_refusal(session, call, permission, arguments, repeated_before=before)
    return Recorded(entry=True)
