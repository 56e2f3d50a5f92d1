"""What the console's pages show that no tool reads: agents' recent activity and refusals, their
budgets, the changesets waiting for a person, and the audit chain's head and latest checkpoint.
Each is one statement on one session; the rest of what the pages show comes from the tools' own
data functions (tasks, audit, changesets, reverts, chain)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, case, func, or_
from sqlalchemy import select as sql_select  # five columns: more than sqlmodel's select types
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import db
from mcp_server.models import (
    AuditAction,
    AuditChain,
    AuditCheckpoint,
    AuditEntry,
    Changeset,
    ChangesetState,
    Project,
    WriteBudgetUse,
)

ACTIVITY_WINDOW = timedelta(hours=24)
MAX_AGENTS = 200
MAX_REFUSALS = 20
MAX_CHANGESETS = 50
MAX_PROJECTS = 500

_REFUSED = case((col(AuditEntry.action) == AuditAction.REFUSED.value, 1), else_=0)
_ACTIVITY = (
    sql_select(
        col(AuditEntry.changed_by),
        func.count().label("entries"),
        func.sum(_REFUSED).label("refusals"),
        func.count(func.distinct(AuditEntry.request_id)).label("calls"),
        func.max(AuditEntry.changed_at).label("last_at"),
    )
    .where(col(AuditEntry.changed_at) >= bindparam("since"))
    .group_by(col(AuditEntry.changed_by))
    .order_by(func.max(AuditEntry.changed_at).desc())
    .limit(MAX_AGENTS)
)
_RECENT_REFUSALS = (
    select(AuditEntry.changed_by, AuditEntry.changed_at, AuditEntry.new_value, AuditEntry.request_id)
    .where(col(AuditEntry.action) == AuditAction.REFUSED.value)
    .order_by(col(AuditEntry.changed_at).desc(), col(AuditEntry.id).desc())  # ix_audit_refused
    .limit(MAX_REFUSALS)
)
_BUDGETS = select(
    WriteBudgetUse.agent_id, WriteBudgetUse.window_start, WriteBudgetUse.calls_used, WriteBudgetUse.rows_used
)
_WAITING = col(Changeset.state) == ChangesetState.PENDING.value
_PENDING = (
    select(Changeset)
    .where(_WAITING, col(Changeset.expires_at) > bindparam("now"))
    .order_by(col(Changeset.created_at))
    .limit(MAX_CHANGESETS)
)
_PENDING_COUNT = (
    select(func.count()).select_from(Changeset).where(_WAITING, col(Changeset.expires_at) > bindparam("now"))
)
# Held changesets decided, or past their time, newest first (previews nobody applied are not shown).
_DECIDED = (
    select(Changeset)
    .where(
        col(Changeset.state) != ChangesetState.PROPOSED.value,
        or_(
            col(Changeset.state) != ChangesetState.PENDING.value,
            col(Changeset.expires_at) <= bindparam("now"),
        ),
    )
    .order_by(col(Changeset.created_at).desc())
    .limit(MAX_CHANGESETS)
)
_HEAD = select(AuditChain.head_seq, AuditChain.head_hash, AuditChain.sealer, AuditChain.lease_until)
_LATEST_CHECKPOINT = (
    select(AuditCheckpoint.seq, AuditCheckpoint.head_hash, AuditCheckpoint.signed_at, AuditCheckpoint.key_id)
    .order_by(col(AuditCheckpoint.seq).desc())
    .limit(1)
)
_PROJECTS = select(Project.id, Project.title).order_by(col(Project.title)).limit(MAX_PROJECTS)


async def activity(session: AsyncSession, now: datetime) -> list[dict[str, Any]]:
    """Who wrote audit entries in the last day: entries, calls, refusals, the latest, newest first."""
    since = {"since": now - ACTIVITY_WINDOW}
    rows = db.named_rows(await session.exec(_ACTIVITY, params=since))  # type: ignore[call-overload]
    return [dict(row) | {"refusals": int(row["refusals"] or 0)} for row in rows]


async def recent_refusals(session: AsyncSession) -> list[dict[str, Any]]:
    rows = db.named_rows(await session.exec(_RECENT_REFUSALS))
    return [
        {
            "changed_by": row["changed_by"],
            "changed_at": row["changed_at"],
            "request_id": row["request_id"],
            "tool": (row["new_value"] or {}).get("tool"),
            "missing": (row["new_value"] or {}).get("missing_permission"),
        }
        for row in rows
    ]


async def budgets_used(session: AsyncSession) -> dict[str, dict[str, Any]]:
    """Each budgeted agent's use of its current (or last) window, by agent id."""
    return {row["agent_id"]: dict(row) for row in db.named_rows(await session.exec(_BUDGETS))}


async def pending_changesets(session: AsyncSession, now: datetime) -> list[Changeset]:
    return list((await session.exec(_PENDING, params={"now": now})).all())


async def pending_count(session: AsyncSession, now: datetime) -> int:
    return int((await session.exec(_PENDING_COUNT, params={"now": now})).one())


async def decided_changesets(session: AsyncSession, now: datetime) -> list[Changeset]:
    return list((await session.exec(_DECIDED, params={"now": now})).all())


async def chain_head(session: AsyncSession) -> dict[str, Any]:
    """The chain's head as the sealer left it, and its latest signed checkpoint (if any)."""
    head = db.named_rows(await session.exec(_HEAD))
    checkpoint = db.named_rows(await session.exec(_LATEST_CHECKPOINT))
    return {
        "head": dict(head[0]) if head else None,
        "checkpoint": dict(checkpoint[0]) if checkpoint else None,
    }


async def projects(session: AsyncSession) -> list[dict[str, Any]]:
    """Live projects by name, for the board's filter."""
    return [{"id": row["id"], "name": row["title"]} for row in db.named_rows(await session.exec(_PROJECTS))]
