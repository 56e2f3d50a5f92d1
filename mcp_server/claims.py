"""Claims: an agent takes a task for a while so that no other agent works on it meanwhile.

A claim is a lease on the task row: who holds it (`claimed_by`), until when (`claim_expires_at`),
and the task's fencing token, one higher with every claim. Nothing clears an expired lease: it
simply counts as none (models.LIVE_HOLDER in SQL, tasks.holder_of in Python), so a crashed agent's
tasks come free when their leases run out, with no job to run. While a lease is live, another
agent's change to the task is refused, naming the holder and the expiry; the holder's own changes
name the fencing token (tasks.check_claim), so a holder whose lease lapsed and was taken by another
writes nothing over the new holder's work.

`claim_task` without a task takes the next task that is free to work on, by the given order, in
one transaction: on PostgreSQL `FOR UPDATE SKIP LOCKED`, so agents claiming at once each get a
different task instead of queueing on the same row; on SQLite the writer holds the file's lock.
Each claim, renewal and release is a change of the task, versioned and audited like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import and_, bindparam, or_
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import audit, filters, graph, scopes, tasks
from mcp_server.errors import ConflictError, InvalidInputError, NotFoundError
from mcp_server.filters import Shape
from mcp_server.identity import Call
from mcp_server.models import CLAIMS_NOW, AuditAction, Task, TaskStatus, utcnow
from mcp_server.schemas import OrderBy, TaskPublic

DEFAULT_LEASE_SECONDS = 300
MIN_LEASE_SECONDS = 10
MAX_LEASE_SECONDS = 3600
# Work that may be taken: not finished, and not set aside as blocked.
CLAIMABLE_STATUSES = (TaskStatus.PENDING.value, TaskStatus.IN_PROGRESS.value)
# The next task to take: the most urgent, then the one waiting longest.
DEFAULT_ORDER = (OrderBy(field="priority", direction="desc"), OrderBy(field="created_at", direction="asc"))

_NOW: Any = bindparam("now")
_FREE = and_(
    col(Task.deleted_at).is_(None),
    col(Task.status).in_(CLAIMABLE_STATUSES),
    or_(col(Task.claimed_by).is_(None), col(Task.claim_expires_at) <= _NOW),
    ~graph.BLOCKED,
)


def _lease_fields(task: Task) -> dict[str, Any]:
    """A claim as its audit entries record it."""
    return {
        "claimed_by": task.claimed_by,
        "claim_expires_at": task.claim_expires_at,
        "fencing_token": task.fencing_token,
    }


@lru_cache(maxsize=256)
def _next_free(shape: Shape | None, order: tuple[tuple[str, bool], ...]) -> Any:
    """The id of the first free task matching a filter of this shape, in this order; the row
    locked, and rows other transactions hold locked skipped (PostgreSQL; SQLite has one writer)."""
    keys = [tasks.sort_column(field, descending) for field, descending in order]
    matching = [] if shape is None else [filters.clause(shape)]
    return (
        select(Task.id)
        .where(_FREE, *matching)
        .order_by(*keys, col(Task.id))
        .limit(1)
        .with_for_update(skip_locked=True, of=Task)
    )


async def claim_task(
    session: AsyncSession,
    call: Call,
    *,
    task_id: int | None,
    filter: tasks.FilterTree | None,
    order_by: Sequence[OrderBy],
    lease_seconds: int,
) -> TaskPublic:
    """Take a task for `lease_seconds`: the given one, or the next free one matching the filter."""
    now = utcnow()
    if task_id is None:
        order = tasks.sort_order(order_by, DEFAULT_ORDER)
        parsed = (None, {}) if filter is None else filters.parse(filter)
        shape, params = scopes.narrow(call.permissions.projects, *parsed)
        found = (
            await session.exec(_next_free(shape, order), params=params | {"now": now, CLAIMS_NOW: now})
        ).first()
        if found is None:
            raise NotFoundError(
                "no task is free to claim"
                + (" that matches the filter" if filter is not None else "")
                + ": every such task is finished, blocked, waiting for another, deleted or held by another "
                "agent. Try again "
                "later, or search_tasks to see who holds what (the claim field)"
            )
        task_id = found
    elif filter is not None or order_by:
        raise InvalidInputError("give task_id, or filter and order_by to take the next free task; not both")
    task = tasks.live(await tasks.find(session, task_id, scope=call.permissions.projects, to_change=True))
    holder = tasks.holder_of(task, now)
    if holder == call.agent_id:
        return tasks.public(task)  # a repeat (a retry): the lease as it is; renew_claim extends it
    if holder is not None:
        raise ConflictError(
            f"task {task.id} is claimed by {holder} until {tasks.claim_end(task)}; claim "
            "another task, or without task_id the next free one"
        )
    if task.status not in CLAIMABLE_STATUSES:
        raise ConflictError(
            f"task {task.id} is {task.status}: only pending or in_progress tasks can be claimed"
        )
    if waiting_for := await graph.blockers(session, task_id, unfinished_only=True):
        listed = ", ".join(str(blocker["id"]) for blocker in waiting_for[:20])
        raise ConflictError(
            f"task {task.id} waits for unfinished tasks ({listed}); claim one of those instead"
        )
    old = _lease_fields(task)
    task.claimed_by = call.agent_id
    task.claim_expires_at = now + timedelta(seconds=lease_seconds)
    task.fencing_token += 1
    task.updated_at = now
    session.add(audit.entry(call, AuditAction.CLAIMED, now, task, old, _lease_fields(task)))
    return await tasks.flush(session, task)


async def renew_claim(
    session: AsyncSession, call: Call, task_id: int, fencing_token: int, lease_seconds: int
) -> TaskPublic:
    """Extend the caller's lease to `lease_seconds` from now. A lease that lapsed is renewed too,
    as long as nobody claimed the task since (the fencing token says so)."""
    now = utcnow()
    task = _held(
        await tasks.find(session, task_id, scope=call.permissions.projects, to_change=True),
        call,
        fencing_token,
        now,
    )
    old = _lease_fields(task)
    task.claim_expires_at = now + timedelta(seconds=lease_seconds)
    task.updated_at = now
    session.add(audit.entry(call, AuditAction.RENEWED, now, task, old, _lease_fields(task)))
    return await tasks.flush(session, task)


async def release_claim(session: AsyncSession, call: Call, task_id: int, fencing_token: int) -> TaskPublic:
    """Give the task up before the lease ends. Releasing a claim already released (the same
    token, nobody holding the task) is a repeat and changes nothing."""
    now = utcnow()
    task = tasks.live(await tasks.find(session, task_id, scope=call.permissions.projects, to_change=True))
    if task.claimed_by is None and task.fencing_token == fencing_token:
        return tasks.public(task)
    task = _held(task, call, fencing_token, now)
    old = _lease_fields(task)
    tasks.release(task)
    task.updated_at = now
    session.add(audit.entry(call, AuditAction.RELEASED, now, task, old, _lease_fields(task)))
    return await tasks.flush(session, task)


def _held(task: Task, call: Call, fencing_token: int, now: Any) -> Task:
    """The task, when the caller's claim on it under this fencing token stands (live, or lapsed
    with nobody claiming it since)."""
    tasks.live(task)
    if task.fencing_token != fencing_token or task.claimed_by != call.agent_id:
        holder = tasks.holder_of(task, now)
        now_held = f"it is held by {holder} until {tasks.claim_end(task)}" if holder else "nobody holds it"
        raise ConflictError(
            f"you hold no claim on task {task.id} under fencing token {fencing_token}: {now_held} "
            f"(fencing token {task.fencing_token}). Nothing was changed; claim_task takes it again "
            "if it is free"
        )
    return task
