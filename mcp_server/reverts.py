"""Undo, and the past: a call's changes to tasks put back from its audit entries' before-values, as
a new change; and a task as it was at a given time, rebuilt from its audit trail.

`revert_request` reads the entries a call wrote (its request id) and undoes each, newest first: an
update sets the fields it changed back to their before-values; a deletion restores the task, a
restore deletes it again, a creation deletes the task it made. Each undo is an ordinary audited
change of the calling agent, whose after-value names the request it reverts (`reverts`).

A task changed again since (any later entry of another call) is never overwritten: it is left,
and the result says who changed it and when; with `atomic`, the whole revert is refused instead,
changing nothing. So is a task another agent holds a claim on. What has no before-value to put
back (claims, comments, dependency edges, refused calls, project changes) is left and said so.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import String, bindparam
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import audit, graph, projects, tasks
from mcp_server.errors import ConflictError, NotFoundError
from mcp_server.identity import Call
from mcp_server.models import (
    AuditAction,
    AuditEntry,
    EntityKind,
    Priority,
    Task,
    TaskStatus,
    UTCDateTime,
    utcnow,
)
from mcp_server.schemas import LeftAsItIs, RevertResult, TaskAsOf, iso_time
from mcp_server.scopes import Scope

MAX_ENTRIES = 10_000
# The task fields an update's entry records and a revert may set back.
FIELDS = frozenset({"title", "description", "status", "priority", "project_id"})
_REVERTIBLE = frozenset(
    {
        AuditAction.CREATED.value,
        AuditAction.UPDATED.value,
        AuditAction.DELETED.value,
        AuditAction.RESTORED.value,
    }
)

_ENTRIES = (
    select(AuditEntry)
    .where(
        col(AuditEntry.request_id) == bindparam("request_id", type_=String),
        # An operator's approval shares the request of the changes it let through; it is no change.
        col(AuditEntry.action) != AuditAction.APPROVED.value,
    )
    .order_by(col(AuditEntry.id).desc())
    .limit(MAX_ENTRIES + 1)
)
_LATER = (
    select(AuditEntry.changed_by, AuditEntry.changed_at, AuditEntry.action)
    .where(
        col(AuditEntry.entity_id) == bindparam("entity_id"),
        col(AuditEntry.id) > bindparam("after"),
        col(AuditEntry.request_id) != bindparam("request_id", type_=String),
    )
    .order_by(col(AuditEntry.id))
    .limit(1)
)


async def revert_request(
    session: AsyncSession, call: Call, request_id: str, *, atomic: bool, dry_run: bool = False
) -> RevertResult:
    """Undo the task changes of call `request_id`; with `dry_run`, only say what would be put back
    and what left (the console's preview), changing nothing."""
    entries = list((await session.exec(_ENTRIES, params={"request_id": request_id})).all())
    if not entries:
        raise NotFoundError(
            f"no change was recorded under request {request_id!r}; a result's request_id, or "
            "get_audit_trail, gives the id of a call that changed something"
        )
    if len(entries) > MAX_ENTRIES:
        raise ConflictError(
            f"request {request_id} changed more than {MAX_ENTRIES:,} rows; a revert this large is not "
            "offered, nothing was changed"
        )
    now = utcnow()
    reverted: list[int] = []
    left: list[LeftAsItIs] = []
    for entry in entries:  # newest first
        assert entry.id is not None
        reason = await _why_not(session, call, request_id, entry)
        if reason is None:
            task = await tasks.find(
                session, entry.entity_id or 0, scope=call.permissions.projects, to_change=True
            )
            reason = await _why_not_now(session, call, entry, task, now)
            if reason is None:
                if not dry_run:
                    await _undo(session, call, request_id, entry, task, now)
                reverted.append(task.id or 0)
                continue
        if atomic:
            raise ConflictError(
                f"task {entry.entity_id} cannot be reverted: {reason}; with atomic, nothing was changed. "
                "Without atomic, the rest is reverted and this task left as it is"
            )
        left.append({"task_id": entry.entity_id or 0, "reason": reason})
    await session.flush()
    return {
        "reverted_request": request_id,
        "changed_count": len(reverted),
        "reverted": sorted(set(reverted)),
        "left": left,
        "request_id": call.request_id,
    }


async def _why_not(session: AsyncSession, call: Call, request_id: str, entry: AuditEntry) -> str | None:
    """Why the entry's change cannot be undone, or None when it can."""
    if entry.entity_type != EntityKind.TASK.value or entry.entity_id is None:
        return "only changes to tasks are reverted (this is a change to a project, or a refused call)"
    if entry.action not in _REVERTIBLE:
        return f"a {entry.action} entry has no before-value to put back"
    if entry.action == AuditAction.UPDATED.value and not set(entry.old_value or {}) <= FIELDS:
        return "a change of its dependencies is undone with add_dependency or remove_dependency"
    params = {"entity_id": entry.entity_id, "after": entry.id, "request_id": request_id}
    later = (await session.exec(_LATER, params=params)).first()
    if later is not None:
        by, at, action = later
        return f"it was {action} again since, by {by} at {iso_time(at)}"
    return None


async def _why_not_now(
    session: AsyncSession, call: Call, entry: AuditEntry, task: Task, now: Any
) -> str | None:
    """Why the task, as it is now, cannot be put back as `entry` found it; None when it can. Putting
    it back must not break what any change would be held to."""
    if (holder := tasks.holder_of(task, now)) not in (None, call.agent_id):
        return f"{holder} holds a claim on it until {tasks.claim_end(task)}"
    before = entry.old_value or {}
    if entry.action == AuditAction.DELETED.value or "project_id" in before:
        project_id = cast(int, before.get("project_id", task.project_id))
        if not await projects.is_live(session, project_id):
            return f"its project {project_id} is deleted (restore_project first)"
    waiting_for = []
    if before.get("status") in graph.NEEDS_UNBLOCKED:
        waiting_for = await graph.blockers(session, task.id or 0, unfinished_only=True)
    if waiting_for:
        listed = ", ".join(str(blocker["id"]) for blocker in waiting_for[:20])
        return f"it would be {before['status']} while it waits for unfinished tasks ({listed})"
    return None


async def _undo(
    session: AsyncSession, call: Call, request_id: str, entry: AuditEntry, task: Task, now: Any
) -> None:
    """Put the task back as it was before `entry`, recording the change."""
    marker = {"reverts": request_id}
    if entry.action in (AuditAction.CREATED.value, AuditAction.RESTORED.value):
        if task.deleted_at is None:
            task.deleted_at, task.updated_at = now, now
            tasks.release(task)
            session.add(
                audit.entry(
                    call, AuditAction.DELETED, now, task, {"deleted_at": None}, {"deleted_at": now} | marker
                )
            )
        return
    if entry.action == AuditAction.DELETED.value:
        if task.deleted_at is not None:
            old = {"deleted_at": task.deleted_at}
            task.deleted_at, task.updated_at = None, now
            session.add(
                audit.entry(call, AuditAction.RESTORED, now, task, old, {"deleted_at": None} | marker)
            )
        return
    before = entry.old_value or {}
    current = tasks.snapshot(task)
    old = {name: current[name] for name in before}
    # The audit form of the values (plain text) as the task's fields hold them.
    values = dict(before)
    if "status" in values:
        values["status"] = TaskStatus(values["status"])
    if "priority" in values:
        values["priority"] = Priority(values["priority"])
    await tasks.change_fields(session, call, task, values)
    task.updated_at = now
    session.add(audit.entry(call, AuditAction.UPDATED, now, task, old, dict(before) | marker))


# --- a task as it was --------------------------------------------------------------------------

_UNTIL = (
    select(AuditEntry)
    .where(
        col(AuditEntry.entity_id) == bindparam("task_id"),
        col(AuditEntry.changed_at) <= bindparam("at", type_=UTCDateTime()),
    )
    .order_by(col(AuditEntry.id))
)


async def task_as_of(session: AsyncSession, task_id: int, at: datetime, scope: Scope) -> TaskAsOf:
    """The task as its audit trail says it was at `at`: the fields its creation recorded, with every
    later change up to `at` applied in order (the trail's after-values), and whether it was deleted."""
    await tasks.find(session, task_id, scope=scope)  # missing, or outside the scope: says so
    state: dict[str, Any] = {}
    deleted = False
    last: AuditEntry | None = None
    for entry in (await session.exec(_UNTIL, params={"task_id": task_id, "at": at})).all():
        after = entry.new_value or {}
        if entry.action in (AuditAction.CREATED.value, AuditAction.UPDATED.value):
            state |= {name: value for name, value in after.items() if name in FIELDS}
        elif entry.action == AuditAction.DELETED.value:
            deleted = True
        elif entry.action == AuditAction.RESTORED.value:
            deleted = False
        else:
            continue  # claims and comments change none of these fields
        last = entry
    if last is None or not set(state) >= FIELDS:
        raise NotFoundError(
            f"task {task_id} has no recorded state at {iso_time(at)}: it was created after that "
            "(get_audit_trail shows when)"
        )
    return {
        "id": task_id,
        "as_of": iso_time(at),
        "title": state["title"],
        "description": state["description"],
        "status": state["status"],
        "priority": state["priority"],
        "project_id": state["project_id"],
        "deleted": deleted,
        "last_change": {
            "action": last.action,
            "changed_by": last.changed_by,
            "changed_at": iso_time(last.changed_at),
            "request_id": last.request_id,
        },
    }
