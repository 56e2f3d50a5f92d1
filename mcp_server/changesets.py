"""Changesets: a change bound to exactly the tasks it was previewed on, applied only while every one
of them is still as it was.

A preview (`dry_run`) of bulk_update_status or bulk_delete_tasks writes a changeset: each task the
change would reach, at the version it was read at, with its before and after (`ChangesetItem`, one
INSERT ... SELECT), and the SHA-256 of all of it (`digest`). Applying it applies exactly those
tasks and nothing else: it locks them in id order, and refuses, changing nothing, when the items
no longer hash to the digest, when any task has another version now, or when the change would now
leave any of them as it is (another agent claimed it since, or it now waits for unfinished work).

An agent's policy (`Permissions.approval_over_rows`) holds a change of more tasks than it allows,
and with 0 every change to a task, as a pending changeset: nothing changes, the `held` entry
records it, and the agent polls get_changeset. An operator approves it (`decide`), bound to the
digest the operator was shown: it is applied at once, as the agent's change (the agent proposed
it, under its verified identity), and the operator's `approved` entry shares the request id of the
changes it let through. Or the operator rejects it (`rejected`), and it never applies.

A changeset can be applied once, until it expires (settings.changeset_ttl_seconds). Previews that
nobody applied are deleted once expired; held ones stay, as the audit log's entries name them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import String, bindparam, delete
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import audit, db, identity, projects, tasks
from mcp_server.config import Permissions
from mcp_server.errors import ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError
from mcp_server.filters import AllOf, AnyOf, Condition
from mcp_server.identity import Call
from mcp_server.models import (
    AuditAction,
    Changeset,
    ChangesetItem,
    ChangesetState,
    Task,
    TaskStatus,
    utcnow,
)
from mcp_server.schemas import (
    ChangesetApplied,
    ChangesetItemPublic,
    ChangesetPublic,
    ChangesetRef,
    ShownState,
    TaskHeld,
    TaskPublic,
    TaskUpdate,
    iso_time,
)
from mcp_server.sql import one_of

FilterTree = Condition | AllOf | AnyOf
R = TypeVar("R")
MAX_SHOWN_ITEMS = 100
MAX_MOVED_SHOWN = 20
PRUNED_PER_CALL = 100
UPDATE = "update"
# The bulk operation behind each tool whose preview is a changeset.
OPERATIONS = {
    "bulk_update_status": tasks.STATUS,
    "bulk_delete_tasks": tasks.DELETE,
    "soft_delete_task": tasks.DELETE,
}

_ITEMS = (
    select(ChangesetItem.task_id, ChangesetItem.version, ChangesetItem.before, ChangesetItem.after)
    .where(col(ChangesetItem.changeset_id) == bindparam("changeset_id", type_=String))
    .order_by(col(ChangesetItem.task_id))
)
# The tasks of a changeset, locked in id order (as a bulk change locks them), deleted ones too.
_LOCK = select(Task.id).where(one_of(col(Task.id), "task_ids")).order_by(col(Task.id)).with_for_update()
# Its tasks that are no longer at the version it was made at.
_MOVED = (
    select(ChangesetItem.task_id, ChangesetItem.version, Task.version)
    .join(Task, col(Task.id) == col(ChangesetItem.task_id))
    .where(
        col(ChangesetItem.changeset_id) == bindparam("changeset_id", type_=String),
        col(Task.version) != col(ChangesetItem.version),
    )
    .order_by(col(ChangesetItem.task_id))
    .limit(MAX_MOVED_SHOWN + 1)
)
_FIRST_IDS = (
    select(ChangesetItem.task_id)
    .where(col(ChangesetItem.changeset_id) == bindparam("changeset_id", type_=String))
    .order_by(col(ChangesetItem.task_id))
    .limit(tasks.MAX_CHANGED_IDS + 1)
)
_EXPIRED_PREVIEWS = (
    select(Changeset.id)
    .where(
        col(Changeset.state) == ChangesetState.PROPOSED.value,
        col(Changeset.expires_at) < bindparam("now"),
    )
    .limit(PRUNED_PER_CALL)
)


def needs_approval(call: Call, task_count: int) -> bool:
    """Whether the agent's policy holds a change of this many tasks for a person's approval."""
    over = call.permissions.approval_over_rows
    return over is not None and task_count > over


def refuse_unheld(call: Call, changed_count: int) -> None:
    """A call that reports how many tasks it changed (a project's deletion, a revert), more than the
    agent's policy lets through without a person: refused, since it cannot wait for approval."""
    if needs_approval(call, changed_count):
        raise PermissionDeniedError(
            "approval_over_rows",
            f"this call would change {changed_count} tasks, and your changes of more than "
            f"{call.permissions.approval_over_rows} wait for a person's approval, which {call.tool} "
            "cannot do (permission approval_over_rows); nothing was changed. bulk_update_status and "
            "bulk_delete_tasks hold such a change for approval; an operator can undo a request in "
            "the console",
        )


# --- making one -------------------------------------------------------------------------------


async def propose(
    session: AsyncSession,
    call: Call,
    ttl: timedelta,
    *,
    status: TaskStatus | None,
    filter: FilterTree | None,
    task_ids: Sequence[int] | None,
    state: ChangesetState = ChangesetState.PROPOSED,
) -> Changeset:
    """The changeset of the bulk change `call.tool` would make now (a status, or a deletion)."""
    now = utcnow()
    await _prune(session, now)
    operation: dict[str, Any] = {"op": OPERATIONS[call.tool]}
    if status is not None:
        operation["status"] = status.value
    changeset = _new(call, operation, now, ttl, state)
    session.add(changeset)
    await session.flush()  # its items refer to it
    changeset.task_count = await tasks.propose(
        session, call, changeset.id, OPERATIONS[call.tool], status=status, filter=filter, task_ids=task_ids
    )
    changeset.summary = _summary(operation, changeset.task_count)
    return await _sealed(session, changeset)


async def hold_deletion(
    session: AsyncSession, call: Call, ttl: timedelta, task_id: int, fencing_token: int | None
) -> TaskHeld:
    """soft_delete_task held by a policy: the task as it is, with its pending changeset."""
    task = tasks.live(await tasks.find(session, task_id, scope=call.permissions.projects))
    tasks.check_claim(task, call, fencing_token, utcnow())
    changeset = await propose(
        session, call, ttl, status=None, filter=None, task_ids=[task_id], state=ChangesetState.PENDING
    )
    return _held(task, hold(session, call, changeset))


async def hold_update(
    session: AsyncSession,
    call: Call,
    ttl: timedelta,
    task_id: int,
    changes: TaskUpdate,
    *,
    expected_version: int | None,
    fencing_token: int | None,
) -> TaskPublic:
    """update_task held by a policy: the task as it is, with the pending changeset of the fields
    the update would change (none when nothing would change)."""
    task = tasks.live(await tasks.find(session, task_id, scope=call.permissions.projects))
    now = utcnow()
    tasks.check_claim(task, call, fencing_token, now)
    if expected_version is not None and task.version != expected_version:
        raise ConflictError(
            f"task {task_id} is at version {task.version}, not {expected_version}: it changed after you "
            "read it, and nothing was changed"
        )
    requested = changes.model_dump(exclude_none=True)
    if not requested:
        raise InvalidInputError(
            "give at least one field to change: title, description, status, priority, project_id"
        )
    old, new = audit.diff(
        tasks.snapshot(task), {key: audit.json_value(value) for key, value in requested.items()}
    )
    if not new:  # nothing would change: nothing to hold, as update_task changes nothing
        return tasks.public(task)
    if "project_id" in new:  # refused now, as update_task would refuse it, not at its approval
        await projects.load_live(session, new["project_id"], call.permissions.projects)
    operation = {"op": UPDATE, "changes": {key: requested[key] for key in new}}
    changeset = _new(call, operation, now, ttl, ChangesetState.PENDING)
    session.add(changeset)
    await session.flush()
    session.add(
        ChangesetItem(changeset_id=changeset.id, task_id=task_id, version=task.version, before=old, after=new)
    )
    changeset.task_count = 1 if new else 0
    changeset.summary = _summary(operation, changeset.task_count, task_id)
    await session.flush()
    changeset = await _sealed(session, changeset)
    return _held(task, hold(session, call, changeset))


async def change_or_hold(
    session: AsyncSession,
    call: Call,
    ttl: timedelta,
    change: Callable[[], Awaitable[R]],
    *,
    status: TaskStatus | None,
    filter: FilterTree | None,
    task_ids: Sequence[int] | None,
) -> R | dict[str, Any]:
    """A bulk change of an agent with a policy: made as asked when the policy lets it through
    (the changeset written to count it is dropped), else held for approval, changing nothing."""
    changeset = await propose(
        session, call, ttl, status=status, filter=filter, task_ids=task_ids, state=ChangesetState.PENDING
    )
    if not needs_approval(call, changeset.task_count):
        await _drop(session, changeset.id)
        return await change()
    tasks.check_bulk_rows(call, changeset.task_count)  # refused now, not at its approval
    held: dict[str, Any] = {
        "dry_run": False,
        "changed_count": 0,
        "changed_ids": [],
        "changed_ids_truncated": False,
    }
    if status is not None:
        held["status"] = status
    return held | {"changeset": hold(session, call, changeset), "request_id": call.request_id}


async def preview(
    session: AsyncSession,
    call: Call,
    ttl: timedelta,
    *,
    status: TaskStatus | None,
    filter: FilterTree | None,
    task_ids: Sequence[int] | None,
) -> dict[str, Any]:
    """A dry run's result: what the change would do, as the changeset that binds it."""
    changeset = await propose(session, call, ttl, status=status, filter=filter, task_ids=task_ids)
    ids = (await session.exec(_FIRST_IDS, params={"changeset_id": changeset.id})).all()
    shown: dict[str, Any] = {
        "dry_run": True,
        "changed_count": changeset.task_count,
        "changed_ids": list(ids[: tasks.MAX_CHANGED_IDS]),
        "changed_ids_truncated": changeset.task_count > tasks.MAX_CHANGED_IDS,
        "changeset": ref(changeset),
    }
    if status is not None:
        shown["status"] = status
    return shown


async def _drop(session: AsyncSession, changeset_id: str) -> None:
    await session.exec(delete(ChangesetItem).where(col(ChangesetItem.changeset_id) == changeset_id))
    await session.exec(delete(Changeset).where(col(Changeset.id) == changeset_id))


def _held(task: Task, changeset: ChangesetRef) -> TaskHeld:
    shown = tasks.public(task)
    return {**shown, "changeset": changeset}


def hold(session: AsyncSession, call: Call, changeset: Changeset) -> ChangesetRef:
    """Record that the change waits for a person's approval (the `held` entry); what the agent is told."""
    session.add(audit.entry(call, AuditAction.HELD, changeset.created_at, None, None, _recorded(changeset)))
    return ref(changeset)


def _new(
    call: Call, operation: dict[str, Any], now: datetime, ttl: timedelta, state: ChangesetState
) -> Changeset:
    return Changeset(
        id=identity.new_request_id(),
        created_by=call.agent_id,
        tool=call.tool,
        operation=operation,
        summary="",
        task_count=0,
        digest="",
        state=state,
        created_at=now,
        expires_at=now + ttl,
        # Only what Permissions holds: an agent's own config entry carries its id and token hash too.
        permissions=call.permissions.model_dump(mode="json", include=set(Permissions.model_fields)),
    )


async def _sealed(session: AsyncSession, changeset: Changeset) -> Changeset:
    changeset.digest = digest(changeset, await _items(session, changeset.id))
    await session.flush()
    return changeset


def _summary(operation: dict[str, Any], count: int, task_id: int | None = None) -> str:
    if operation["op"] == tasks.STATUS:
        return f"set the status of {count} task(s) to {operation['status']}"
    if operation["op"] == tasks.DELETE:
        return f"delete {count} task(s)"
    return f"change {', '.join(sorted(operation['changes'])) or 'nothing'} of task {task_id}"


async def _prune(session: AsyncSession, now: datetime) -> None:
    """Delete a few expired previews nobody applied (they were never on the record)."""
    expired = list((await session.exec(_EXPIRED_PREVIEWS, params={"now": now})).all())
    if expired:
        await session.exec(delete(ChangesetItem).where(col(ChangesetItem.changeset_id).in_(expired)))
        await session.exec(delete(Changeset).where(col(Changeset.id).in_(expired)))


# --- its digest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    task_id: int
    version: int
    before: dict[str, Any]
    after: dict[str, Any]


async def _items(session: AsyncSession, changeset_id: str) -> list[Item]:
    found = db.named_rows(await session.exec(_ITEMS, params={"changeset_id": changeset_id}))
    return [Item(row["task_id"], row["version"], row["before"], row["after"]) for row in found]


def digest(changeset: Changeset, items: Sequence[Item]) -> str:
    """The SHA-256 of everything the changeset is: who made it, when, with which tool and what
    permissions, what it does and says it does, and each task with its version, before and after,
    in id order (canonical JSON)."""
    content = {
        "id": changeset.id,
        "created_by": changeset.created_by,
        "tool": changeset.tool,
        "operation": changeset.operation,
        "summary": changeset.summary,
        "task_count": changeset.task_count,
        "created_at": iso_time(changeset.created_at),
        "permissions": changeset.permissions,
        "items": [[item.task_id, item.version, item.before, item.after] for item in items],
    }
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


# --- applying and deciding --------------------------------------------------------------------


async def apply_own(session: AsyncSession, call: Call, changeset_id: str) -> ChangesetApplied:
    """apply_changeset: the calling agent applies a preview of its own."""
    changeset = await _load(session, changeset_id, created_by=call.agent_id)
    if changeset.state == ChangesetState.PENDING:
        raise ConflictError(
            f"changeset {changeset_id} waits for a person's approval; get_changeset tells when it is "
            "decided (an approved one is applied then, without you)"
        )
    _check_open(changeset)
    if needs_approval(call, changeset.task_count):
        # A preview is no way around the agent's policy: applying it holds it for a person.
        changeset.state = ChangesetState.PENDING
        await session.flush()
        return {
            "changeset": hold(session, call, changeset),
            "changed_count": 0,
            "changed_ids": [],
            "changed_ids_truncated": False,
            "request_id": call.request_id,
        }
    changed = await _apply(session, call, changeset)
    return {
        "changeset": ref(changeset),
        "changed_count": changed["changed_count"],
        "changed_ids": changed["changed_ids"],
        "changed_ids_truncated": changed["changed_ids_truncated"],
        "request_id": call.request_id,
    }


async def decide(
    session: AsyncSession, operator_id: str, changeset_id: str, shown_digest: str, *, approve: bool
) -> Changeset:
    """An operator approves (it is applied now) or rejects a pending changeset, bound to the digest
    they were shown: a changeset that is not that one any more is refused."""
    changeset = await _load(session, changeset_id)
    _check_open(changeset)
    if changeset.state != ChangesetState.PENDING:
        raise ConflictError(f"changeset {changeset_id} is not waiting for approval")
    if shown_digest != changeset.digest:
        raise ConflictError(
            f"changeset {changeset_id} is not the one you were shown (its digest differs); "
            "nothing was decided. Reload it and decide again"
        )
    now = utcnow()
    operator = Call(
        tool="console/approve" if approve else "console/reject",
        agent_id=operator_id,
        permissions=identity.UNRESTRICTED,
        request_id=identity.new_request_id(),
    )
    if approve:
        # The change is the agent's: it proposed it, under its own verified identity.
        # Within what the agent was allowed when it proposed it (its projects, max_bulk_rows), less
        # the policy that held it, which this approval answers. A person approving it is what the
        # policy asks for, so its rows are not counted against the agent's write budget.
        allowed = Permissions.model_validate(changeset.permissions).model_copy(
            update={"approval_over_rows": None, "read_only": False}
        )
        as_agent = Call(
            tool=changeset.tool,
            agent_id=changeset.created_by,
            permissions=allowed,
            request_id=operator.request_id,
        )
        await _apply(session, as_agent, changeset)
    else:
        changeset.state = ChangesetState.REJECTED
    changeset.decided_by, changeset.decided_at = operator_id, now
    action = AuditAction.APPROVED if approve else AuditAction.REJECTED
    session.add(audit.entry(operator, action, now, None, None, _recorded(changeset)))
    await session.flush()
    return changeset


async def _load(session: AsyncSession, changeset_id: str, *, created_by: str | None = None) -> Changeset:
    found = (
        await session.exec(select(Changeset).where(col(Changeset.id) == changeset_id).with_for_update())
    ).first()
    if found is None or (created_by is not None and found.created_by != created_by):
        raise NotFoundError(
            f"changeset {changeset_id!r} does not exist or is not yours; a dry run's result gives "
            "the id of a changeset you made"
        )
    return found


def _check_open(changeset: Changeset) -> None:
    """A changeset applied or rejected is decided for good; one expired can no longer be applied."""
    if changeset.state == ChangesetState.APPLIED:
        raise ConflictError(
            f"changeset {changeset.id} was already applied (request {changeset.applied_request_id})"
        )
    if changeset.state == ChangesetState.REJECTED:
        raise ConflictError(
            f"changeset {changeset.id} was rejected by {changeset.decided_by}; it never applies"
        )
    if changeset.expires_at <= utcnow():
        raise ConflictError(
            f"changeset {changeset.id} expired at {iso_time(changeset.expires_at)}; preview the change again"
        )


async def _apply(session: AsyncSession, call: Call, changeset: Changeset) -> dict[str, Any]:
    """Apply exactly the changeset's tasks, or refuse with nothing changed."""
    items = await _items(session, changeset.id)
    if digest(changeset, items) != changeset.digest:
        raise ConflictError(
            f"changeset {changeset.id} no longer matches its digest: it was altered after it was made; "
            "nothing was changed"
        )
    ids = [item.task_id for item in items]
    await session.exec(_LOCK, params={"task_ids": ids}, execution_options=db.INCLUDE_DELETED)
    await _refuse_if_moved(session, changeset)
    operation = changeset.operation
    changed: dict[str, Any]
    if not ids:
        changed = {"changed_count": 0, "changed_ids": [], "changed_ids_truncated": False}
    elif operation["op"] == tasks.STATUS:
        status = TaskStatus(operation["status"])
        result = await tasks.bulk_update_status(session, call, status, filter=None, task_ids=ids)
        changed = {key: result[key] for key in ("changed_count", "changed_ids", "changed_ids_truncated")}
    elif operation["op"] == tasks.DELETE:
        deleted = await tasks.bulk_delete_tasks(session, call, filter=None, task_ids=ids)
        changed = {key: deleted[key] for key in ("changed_count", "changed_ids", "changed_ids_truncated")}
    else:
        changes = TaskUpdate(**operation["changes"])
        await tasks.update_task(session, call, ids[0], changes, expected_version=items[0].version)
        changed = {"changed_count": 1, "changed_ids": ids, "changed_ids_truncated": False}
    if changed["changed_count"] != len(ids):
        raise ConflictError(
            f"changeset {changeset.id} would now change {changed['changed_count']} of its {len(ids)} "
            "tasks (another agent claimed some since, or they now wait for unfinished tasks); nothing "
            "was changed. Preview the change again"
        )
    changeset.state = ChangesetState.APPLIED
    changeset.applied_request_id = call.request_id
    await session.flush()
    return changed


async def _refuse_if_moved(session: AsyncSession, changeset: Changeset) -> None:
    moved = (
        await session.exec(
            _MOVED, params={"changeset_id": changeset.id}, execution_options=db.INCLUDE_DELETED
        )
    ).all()
    if moved:
        shown = "; ".join(
            f"task {task_id} is at version {now}, not {then}" for task_id, then, now in moved[:20]
        )
        more = " and more" if len(moved) > MAX_MOVED_SHOWN else ""
        raise ConflictError(
            f"changeset {changeset.id} is out of date: its tasks changed since it was made ({shown}{more}); "
            "nothing was changed. Preview the change again"
        )


async def is_current(session: AsyncSession, changeset_id: str) -> bool:
    """Whether every task of the changeset is still at the version it was made at."""
    moved = await session.exec(
        _MOVED, params={"changeset_id": changeset_id}, execution_options=db.INCLUDE_DELETED
    )
    return moved.first() is None


# --- what is shown ----------------------------------------------------------------------------


def state_of(changeset: Changeset, now: datetime | None = None) -> ShownState:
    """Its state as shown: `expired` for one still undecided past its time."""
    open_ = changeset.state in (ChangesetState.PROPOSED, ChangesetState.PENDING)
    if open_ and changeset.expires_at <= (now or utcnow()):
        return "expired"
    return ChangesetState(changeset.state).value


def ref(changeset: Changeset) -> ChangesetRef:
    return {
        "id": changeset.id,
        "state": state_of(changeset),
        "summary": changeset.summary,
        "task_count": changeset.task_count,
        "digest": changeset.digest,
        "expires_at": iso_time(changeset.expires_at),
    }


async def get_changeset(
    session: AsyncSession, changeset_id: str, *, created_by: str | None, limit: int = MAX_SHOWN_ITEMS
) -> ChangesetPublic:
    """A changeset with its first `limit` items, and whether its tasks are still as it found them.
    With `created_by`, only that agent's."""
    found = (await session.exec(select(Changeset).where(col(Changeset.id) == changeset_id))).first()
    if found is None or (created_by is not None and found.created_by != created_by):
        raise NotFoundError(f"changeset {changeset_id!r} does not exist or is not yours")
    items = await _items(session, changeset_id)
    head = ref(found)
    shown: ChangesetPublic = {
        "id": head["id"],
        "state": head["state"],
        "summary": head["summary"],
        "task_count": head["task_count"],
        "digest": head["digest"],
        "expires_at": head["expires_at"],
        "tool": found.tool,
        "created_by": found.created_by,
        "created_at": iso_time(found.created_at),
        "items": [_item_public(item) for item in items[:limit]],
        "items_truncated": len(items) > limit,
    }
    if found.state in (ChangesetState.PROPOSED, ChangesetState.PENDING):
        shown["current"] = await is_current(session, changeset_id)
    if found.decided_by is not None and found.decided_at is not None:
        shown["decided_by"], shown["decided_at"] = found.decided_by, iso_time(found.decided_at)
    if found.applied_request_id is not None:
        shown["applied_request_id"] = found.applied_request_id
    return shown


def _item_public(item: Item) -> ChangesetItemPublic:
    return {"task_id": item.task_id, "version": item.version, "before": item.before, "after": item.after}


def _recorded(changeset: Changeset) -> dict[str, Any]:
    """What an audit entry about a changeset records of it."""
    return {
        "changeset": changeset.id,
        "tool": changeset.tool,
        "proposed_by": changeset.created_by,
        "summary": changeset.summary,
        "task_count": changeset.task_count,
        "digest": changeset.digest,
    }
