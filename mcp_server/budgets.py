"""Write budgets: the most writing calls and changed rows an agent may make per window of time.

An agent's budget (`Permissions.write_budget`) is kept in the database, one row per agent
(`write_budget`), so it holds across every server process on that database. Windows are fixed,
aligned to the epoch: a budget of 100 calls per 60 s allows 100 calls in each whole minute.

A writing call is checked twice, in its own transaction: before its work (`check`: a spent budget
refuses at once, having done nothing), and after (`spend`: one upsert adds the call and the rows
it changed, and a total over the budget refuses the call, whose transaction then rolls back). So
what is counted is exactly what committed, and two processes cannot both take the last of a
budget: the upsert holds the agent's row until the call commits. Only agents with a budget pay
for it (two statements a call) or wait on it (their own writes, at their commit).

A refusal names `write_budget` and says when to retry; the guard records it like any other.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, case
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import db
from mcp_server.config import WriteBudget
from mcp_server.errors import PermissionDeniedError
from mcp_server.identity import Call
from mcp_server.models import UTCDateTime, WriteBudgetUse, utcnow
from mcp_server.schemas import iso_time

PERMISSION = "write_budget"

_USED = select(WriteBudgetUse.window_start, WriteBudgetUse.calls_used, WriteBudgetUse.rows_used).where(
    col(WriteBudgetUse.agent_id) == bindparam("agent_id")
)


def _upsert(insert: Any) -> Any:
    """Add one call and its rows to the agent's window, starting the window over when a new one
    has begun; the totals after. (PostgreSQL's and SQLite's INSERT ... ON CONFLICT, spelled alike.)"""
    table = WriteBudgetUse.__table__  # type: ignore[attr-defined]  # SQLModel does not declare it
    adding = insert(table).values(
        agent_id=bindparam("agent_id"),
        window_start=bindparam("window_start", type_=UTCDateTime()),
        calls_used=1,
        rows_used=bindparam("rows"),
    )
    same_window = table.c.window_start == adding.excluded.window_start
    return adding.on_conflict_do_update(
        index_elements=[table.c.agent_id],
        set_={
            "calls_used": case((same_window, table.c.calls_used + 1), else_=1),
            "rows_used": case(
                (same_window, table.c.rows_used + adding.excluded.rows_used), else_=adding.excluded.rows_used
            ),
            "window_start": adding.excluded.window_start,
        },
    ).returning(table.c.calls_used, table.c.rows_used)


_SPEND = {"postgresql": _upsert(postgresql.insert), "sqlite": _upsert(sqlite.insert)}


def window_of(budget: WriteBudget, now: datetime) -> datetime:
    """The start of the window `now` falls in."""
    seconds = int(now.timestamp()) // budget.window_seconds * budget.window_seconds
    return datetime.fromtimestamp(seconds, UTC)


async def check(session: AsyncSession, call: Call) -> None:
    """Refuse the call before it does anything when the agent's budget for this window is spent."""
    if (budget := call.permissions.write_budget) is None:
        return
    now = utcnow()
    start = window_of(budget, now)
    rows = db.named_rows(await session.exec(_USED, params={"agent_id": call.agent_id}))
    if not rows or rows[0]["window_start"] != start:
        return
    used = rows[0]
    if budget.calls is not None and used["calls_used"] >= budget.calls:
        raise _spent(budget, start, now, f"{used['calls_used']} writing calls of {budget.calls}")
    if budget.rows is not None and used["rows_used"] >= budget.rows:
        raise _spent(budget, start, now, f"{used['rows_used']} changed rows of {budget.rows}")


async def spend(session: AsyncSession, call: Call, rows: int) -> None:
    """Count the call and the `rows` it changed; refuse it (its transaction rolls back) when that
    takes the agent over its budget for this window."""
    if (budget := call.permissions.write_budget) is None:
        return
    now = utcnow()
    start = window_of(budget, now)
    statement = _SPEND[session.get_bind().dialect.name]
    params = {"agent_id": call.agent_id, "window_start": start, "rows": rows}
    used = db.named_rows(await session.exec(statement, params=params))[0]
    if budget.calls is not None and used["calls_used"] > budget.calls:
        raise _spent(budget, start, now, f"{budget.calls} writing calls of {budget.calls}")
    if budget.rows is not None and used["rows_used"] > budget.rows:
        left = budget.rows - (used["rows_used"] - rows)
        raise _spent(
            budget,
            start,
            now,
            f"this call would change {rows} rows and {max(left, 0)} of {budget.rows} are left",
        )


def _spent(budget: WriteBudget, start: datetime, now: datetime, used: str) -> PermissionDeniedError:
    ends = start + timedelta(seconds=budget.window_seconds)
    wait = max(1, int((ends - now).total_seconds() + 0.999))
    limits = ", ".join(
        f"{limit} {what}"
        for limit, what in ((budget.calls, "writing calls"), (budget.rows, "changed rows"))
        if limit is not None
    )
    return PermissionDeniedError(
        PERMISSION,
        f"your write budget is spent for now ({used}; you may make {limits} per {budget.window_seconds} s); "
        f"nothing was changed. Retry after {iso_time(ends)} (in {wait} s)",
    )
