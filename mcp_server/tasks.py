"""Task data functions. Each takes the call's session (and the call, when it writes) and never commits.

One task is loaded as a `Task` with its project eager-loaded in the same statement; a page of
tasks is read as named rows. A change that reads its task first (update, restore) changes the
loaded object and flushes it with its audit entry, the ORM checking the task's version on the way
(a change made meanwhile is a conflict, never a lost update). A change chosen by a condition
(create in a live project, delete a live task) is one statement with its audit entry
(db.one_change). A bulk change (a status, a deletion, and for project_changes.py a move or a
restore of a project's tasks) is set-based: one statement on PostgreSQL, three on SQLite, whatever
the number of tasks. Every read and change is within the caller's project scope (scopes.py).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple, cast

from pydantic_core import to_json
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    RowMapping,
    String,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    or_,
    update,
)
from sqlalchemy import select as sql_select  # the row an INSERT ... SELECT writes
from sqlalchemy.orm import QueryableAttribute, aliased, joinedload
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.orm.interfaces import ORMOption
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import Select, SelectOfScalar
from typing_extensions import TypedDict

from mcp_server import audit, db, filters, graph, locks, paging, projects, scopes, titles
from mcp_server.db import INCLUDE_DELETED
from mcp_server.errors import ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError
from mcp_server.filters import AllOf, AnyOf, Condition, FilterField, Operator, Shape
from mcp_server.identity import Call
from mcp_server.models import (
    AUDIT_TABLE,
    CLAIMS_NOW,
    ENTITY_TABLE,
    LIVE_HOLDER,
    AuditAction,
    AuditEntry,
    ChangesetItem,
    Entity,
    EntityKind,
    JSONValue,
    Priority,
    Project,
    Task,
    TaskStatus,
    UTCDateTime,
    utcnow,
)
from mcp_server.schemas import (
    COUNT_CAP,
    BulkDeleteResult,
    BulkUpdateResult,
    OrderBy,
    TaskCreate,
    TaskPage,
    TaskPublic,
    TaskUpdate,
    iso_time,
)
from mcp_server.scopes import Scope
from mcp_server.sql import iso_text, json_object, one_of

MAX_CHANGED_IDS = 500
DEFAULT_ORDER = (OrderBy(field="created_at", direction="desc"),)
BULK_STEPS = 3

FilterTree = Condition | AllOf | AnyOf

# A task comes with its project, joined in the same statement; of the project, its name is shown.
_PROJECT_NAME = cast(QueryableAttribute[str], Entity.title)  # SQLModel types it as the value


def _with_project(task: Any) -> ORMOption:
    """The loading of `task`'s project (`task` is Task, or an alias of it)."""
    return joinedload(task.project, innerjoin=True).load_only(_PROJECT_NAME)


_WITH_PROJECT = _with_project(Task)

# A page of tasks is read as named rows: the task's fields and its project's name, joined in the
# same statement, its times as text in the tools' format (sql.iso_text). Fifty Task objects (and
# their projects) cost the ORM about 1 ms more to build than fifty rows (bench/profile.py), and a
# page only shows them.
_project = aliased(Entity, name="project")
_TASK_ROW = (
    *(getattr(Task, name) for name in ("id", "title", "description", "status", "priority", "project_id")),
    col(_project.title).label("project_name"),
    *(iso_text(getattr(Task, name)).label(name) for name in ("created_at", "updated_at", "deleted_at")),
    Task.version,
    LIVE_HOLDER.label("claim_holder"),
    iso_text(Task.claim_expires_at).label("claim_expires_at"),
    Task.fencing_token,
)


def _page_item(row: RowMapping) -> TaskPublic:
    """A row of _TASK_ROW as the tools show a task, read by name."""
    public: TaskPublic = {
        "id": row["id"],
        "title": row["title"],
        "description": row["description"],
        "status": row["status"],
        "priority": row["priority"].value,  # plain text: each pass over the result handles it faster
        "project": {"id": row["project_id"], "name": row["project_name"]},
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "version": row["version"],
    }
    if (deleted_at := row["deleted_at"]) is not None:
        public["deleted_at"] = deleted_at
    if (holder := row["claim_holder"]) is not None:
        public["claim"] = {
            "holder": holder,
            "expires_at": row["claim_expires_at"],
            "fencing_token": row["fencing_token"],
        }
    return public


def public(task: Any) -> TaskPublic:
    """A loaded Task, its project loaded with it, as the tools show it (its fields, which SQLModel
    types as optional since projects share the table, are all set on a task)."""
    public: TaskPublic = {
        "id": task.id,
        "title": task.title,
        "description": task.description,
        "status": task.status,
        "priority": task.priority,
        "project": {"id": task.project_id, "name": task.project.title},
        "created_at": iso_time(task.created_at),
        "updated_at": iso_time(task.updated_at),
        "version": task.version,
    }
    if task.deleted_at is not None:
        public["deleted_at"] = iso_time(task.deleted_at)
    if (holder := holder_of(task)) is not None:
        public["claim"] = {
            "holder": holder,
            "expires_at": claim_end(task),
            "fencing_token": task.fencing_token,
        }
    return public


def holder_of(task: Any, now: datetime | None = None) -> str | None:
    """The agent holding a live claim on the task, if any (an expired claim holds nothing)."""
    if task.claimed_by is None or task.claim_expires_at is None:
        return None
    return task.claimed_by if task.claim_expires_at > (now or utcnow()) else None


def claim_end(task: Any) -> str:
    """When the task's claim ends (ended), as the tools show times."""
    return iso_time(task.claim_expires_at) if task.claim_expires_at is not None else "none"


def check_claim(task: Task, call: Call, fencing_token: int | None, now: datetime) -> None:
    """Refuse a change to a task another agent holds, or one whose fencing token is not the one
    given: a holder whose lease lapsed and was taken by another writes nothing over the new
    holder's work. The holder itself names its token, so a retry from before a lapse is caught."""
    holder = holder_of(task, now)
    if holder is not None and holder != call.agent_id:
        raise ConflictError(
            f"task {task.id} is claimed by {holder} until {claim_end(task)}; nothing was "
            "changed. Work on another task (claim_task with no task_id takes the next free one), or "
            "try again after that time"
        )
    if fencing_token is not None and fencing_token != task.fencing_token:
        raise ConflictError(
            f"fencing token {fencing_token} is stale: task {task.id} was claimed again since (its token "
            f"is now {task.fencing_token}), so your claim ended and nothing was changed. Read the task "
            "and claim it again before changing it"
        )
    if holder is not None and fencing_token is None:
        raise ConflictError(
            f"you hold task {task.id}'s claim: pass its fencing_token ({task.fencing_token}) with the "
            "change, so a change from an ended claim can never land; nothing was changed"
        )


def release(task: Task) -> None:
    """Let go of the task's claim (the fencing token stays: the next claim counts on from it)."""
    task.claimed_by = None
    task.claim_expires_at = None


def snapshot(task: Task) -> dict[str, Any]:
    """The audited fields of a task, as its audit entries name them."""
    return {
        "title": task.title,
        "description": task.description,
        "status": audit.json_value(task.status),
        "priority": audit.json_value(task.priority),
        "project_id": task.project_id,
    }


# Sortable field -> (column, its value in a row of _TASK_ROW as JSON in a page token, and back to a
# value to compare with). A row holds its times as text already.
_SORTABLE: dict[str, tuple[Any, Any, Any]] = {
    "created_at": (Task.created_at, str, paging.load_time),
    "updated_at": (Task.updated_at, str, paging.load_time),
    "title": (Task.title, str, str),
    "priority": (Task.priority, audit.json_value, Priority),
    "id": (Task.id, int, paging.load_id),
}

SortOrder = tuple[tuple[str, bool], ...]  # (field, descending), most significant first


def sort_order(order_by: Sequence[OrderBy], default: Sequence[OrderBy]) -> SortOrder:
    """An agent's order_by (or the default) as (field, descending) pairs; a field named twice is refused."""
    order = tuple((item.field, item.direction == "desc") for item in order_by or default)
    if len({field for field, _ in order}) != len(order):
        raise InvalidInputError("order_by names a field twice; give each field once")
    return order


def sort_column(field: str, descending: bool) -> Any:
    """The ORDER BY term of a sortable field."""
    column = col(_SORTABLE[field][0])
    return column.desc() if descending else column.asc()


def _sort_key(field: str, descending: bool) -> paging.SortKey:
    column, dump, load = _SORTABLE[field]
    return paging.SortKey(field, column, descending, dump, load)


@lru_cache(maxsize=64)
def _sort_keys(order: SortOrder) -> tuple[paging.SortKey, ...]:
    keys = [_sort_key(field, descending) for field, descending in order]
    if all(key.name != "id" for key in keys):
        # id breaks ties, so the order is total and keyset paging neither skips nor repeats a row.
        keys.append(_sort_key("id", keys[-1].descending))
    return tuple(keys)


def _matching(shape: Shape | None) -> list[ColumnElement[bool]]:
    return [] if shape is None else [filters.clause(shape)]


# Searches that differ only in their values share one statement, built on first use and kept: the
# filter's shape, the order, the page size and whether it is a first page decide the SQL.
@lru_cache(maxsize=512)
def _search_statement(
    shape: Shape | None, order: SortOrder, first: bool, limit: int
) -> Select[*tuple[Any, ...]]:
    with_project: Select[*tuple[Any, ...]] = Select(*_TASK_ROW).join(
        _project, col(Task.project_id) == _project.id
    )
    return paging.paged(with_project.where(*_matching(shape)), _sort_keys(order), first=first, limit=limit)


@lru_cache(maxsize=512)
def _count_statement(shape: Shape | None) -> SelectOfScalar[int]:
    """How many tasks match, counting no further than COUNT_CAP: a page stays cheap however many match."""
    matching = select(Task.id).where(*_matching(shape)).limit(COUNT_CAP + 1).subquery()
    return select(func.count()).select_from(matching)


async def search_tasks(
    session: AsyncSession,
    *,
    filter: FilterTree | None,
    order_by: Sequence[OrderBy],
    limit: int,
    page_token: str | None,
    include_deleted: bool,
    include_total: bool,
    scope: Scope,
) -> TaskPage:
    """A page of the tasks matching `filter` within `scope`'s projects."""
    order = sort_order(order_by, DEFAULT_ORDER)
    shape, params = scopes.narrow(scope, *((None, {}) if filter is None else filters.parse(filter)))
    keys = _sort_keys(order)
    query = paging.fingerprint(shape, params, order, include_deleted)
    options = INCLUDE_DELETED if include_deleted else {}
    found = await session.exec(
        _search_statement(shape, order, page_token is None, limit),
        params=params | paging.page_params(keys, page_token=page_token, query=query) | {CLAIMS_NOW: utcnow()},
        execution_options=options,
    )
    rows = db.named_rows(found)
    page = paging.cut(rows, keys, limit=limit, query=query, value=operator.getitem)
    items = [_page_item(row) for row in page.rows]
    result: TaskPage = {"items": items, "has_more": page.has_more}
    if (token := page.next_page_token) is not None:
        result["next_page_token"] = token
    if include_total:
        counting = await session.exec(
            _count_statement(shape), params=params | {CLAIMS_NOW: utcnow()}, execution_options=options
        )
        counted = counting.one()
        result["total"], result["total_exact"] = min(counted, COUNT_CAP), counted <= COUNT_CAP
    return result


async def get_task(session: AsyncSession, task_id: int, scope: Scope) -> TaskPublic:
    shown = public(live(await find(session, task_id, scope=scope)))
    if blockers := await graph.blockers(session, task_id, unfinished_only=False):
        shown["blocked_by"] = blockers
    return shown


_BY_ID = select(Task).options(_WITH_PROJECT).where(col(Task.id) == bindparam("task_id"))
# A task about to be changed from what it is now: its row stays locked until the call commits, so
# two calls changing one task take turns instead of one failing on the other's new version.
_BY_ID_TO_CHANGE = _BY_ID.with_for_update(of=Task)


async def find(session: AsyncSession, task_id: int, *, scope: Scope, to_change: bool = False) -> Task:
    """The task, deleted or not, with its project; locked until the call ends `to_change` it. One
    outside `scope`'s projects is refused (scopes.require)."""
    statement = _BY_ID_TO_CHANGE if to_change else _BY_ID
    found = await session.exec(statement, params={"task_id": task_id}, execution_options=INCLUDE_DELETED)
    task = found.first()
    if task is None:
        raise NotFoundError(
            f"task {task_id} does not exist; search_tasks finds tasks by title or other fields"
        )
    scopes.require(scope, cast(int, task.project_id), f"task {task_id}")
    return task


def live(task: Task) -> Task:
    if task.deleted_at is not None:
        raise NotFoundError(
            f"task {task.id} was deleted at {iso_time(task.deleted_at)}; restore_task brings it back"
        )
    return task


async def flush(session: AsyncSession, task: Task) -> TaskPublic:
    """Write the changes made to `task` and its audit entry; the task as it now is."""
    try:
        await session.flush()
    except StaleDataError:
        # The version the task was read at is gone: someone changed it meanwhile.
        raise ConflictError(
            f"task {task.id} changed while this call was changing it; nothing was changed, retry"
        ) from None
    return public(task)


def _new(name: str) -> Any:
    """A new value of the task field `name`, bound as new_<name> and converted as the column converts it."""
    return bindparam(f"new_{name}", type_=ENTITY_TABLE.c[name].type)


# A change defined by a condition (a live project to create the task in, a live task to delete)
# needs no read before it: the change, its audit entry and the task as changed, in one go.
_OTHER = ENTITY_TABLE.alias("other")
# A live task of the project with the new task's title key: the duplicate guard (titles.py).
_SAME_TITLE = exists().where(
    _OTHER.c.project_id == col(Project.id),
    _OTHER.c.title_key == bindparam("new_title_key", type_=String),
    _OTHER.c.kind == EntityKind.TASK.value,
    _OTHER.c.deleted_at.is_(None),
)


def _creating(*, guarded: bool) -> db.OneChange[Task]:
    """The statements of a create in a live project; `guarded`, only when no live task of the
    project has the same title key (the index ix_entity_title_key answers that)."""
    condition = [col(Project.id) == bindparam("project_id"), col(Project.deleted_at).is_(None)]
    if guarded:
        condition.append(~_SAME_TITLE)
    return db.one_change(
        Task,
        insert(Task).from_select(
            [
                "kind",
                "title",
                "title_key",
                "description",
                "status",
                "priority",
                "project_id",
                "created_at",
                "updated_at",
                "version",
            ],
            sql_select(
                literal(EntityKind.TASK.value),
                _new("title"),
                _new("title_key"),
                _new("description"),
                _new("status"),
                _new("priority"),
                col(Project.id),
                bindparam("at", type_=UTCDateTime()),
                bindparam("at", type_=UTCDateTime()),
                literal(1),
            )
            .where(*condition)
            # PostgreSQL: wait for a deletion of the project under way (project_changes.py), then
            # see it deleted, rather than create a task in it.
            .with_for_update(key_share=True),
        ),
        lambda changed: audit.entry_of(changed, AuditAction.CREATED),
        _with_project,
    )


_CREATED = _creating(guarded=False)
_CREATED_UNLESS_SAME_TITLE = _creating(guarded=True)
_SAME_TITLE_TASK = (
    select(Task.id, Task.title)
    .where(col(Task.project_id) == bindparam("project_id"), col(Task.title_key) == bindparam("title_key"))
    .order_by(col(Task.id))
    .limit(1)
)


async def create_task(
    session: AsyncSession, call: Call, data: TaskCreate, *, allow_duplicate: bool = False
) -> TaskPublic:
    """Create a task in a live project; unless `allow_duplicate`, refused when a live task there
    has the same title as titles.py compares them, naming it."""
    scopes.require(call.permissions.projects, data.project_id, f"project {data.project_id}")
    now = utcnow()
    title_key = titles.key(data.title)
    new = {
        "title": data.title,
        "description": data.description,
        "status": data.status,
        "priority": data.priority,
        "project_id": data.project_id,
    }
    params = {f"new_{name}": value for name, value in new.items() if name != "project_id"}
    params |= {"project_id": data.project_id, "new_title_key": title_key}
    params |= audit.entry_params(call, now, None, new)
    if not allow_duplicate:
        # Creates of one title in one project take turns from the guard's check to their commit,
        # so two at once cannot both find no duplicate.
        await locks.take(session, locks.Space.TITLES, f"{data.project_id}:{title_key}")
    statements = _CREATED if allow_duplicate else _CREATED_UNLESS_SAME_TITLE
    task = await db.run_one_change(session, statements, params)
    if task is None:  # the INSERT read no live project, or found the same title there
        await projects.load_live(session, data.project_id, call.permissions.projects)
        same = {"project_id": data.project_id, "title_key": title_key}
        rows = db.named_rows(await session.exec(_SAME_TITLE_TASK, params=same))
        if not rows:
            raise ConflictError(f"project {data.project_id} changed while the task was being created; retry")
        raise ConflictError(
            f"project {data.project_id} already has a live task with this title: task {rows[0]['id']} "
            f"{rows[0]['title']!r} (titles are compared ignoring case, spacing and Unicode width and "
            "compatibility forms); nothing was created. Work on that task, or pass allow_duplicate=true "
            "if a second task of that title is meant"
        )
    return public(task)


_FENCING_TOKEN = bindparam("given_fencing_token", type_=BigInteger)
# The task's claim lets this call change it: no live claim, or the caller's; and a fencing token
# given is the task's. (check_claim says which of these failed.)
_CLAIM_ALLOWS = and_(
    or_(
        col(Task.claimed_by).is_(None),
        col(Task.claim_expires_at) <= bindparam("at"),
        and_(col(Task.claimed_by) == bindparam("audit_changed_by"), _FENCING_TOKEN.is_not(None)),
    ),
    or_(_FENCING_TOKEN.is_(None), col(Task.fencing_token) == _FENCING_TOKEN),
)
_DELETED = db.one_change(
    Task,
    update(Task)
    .where(col(Task.id) == bindparam("task_id"), col(Task.deleted_at).is_(None), _CLAIM_ALLOWS)
    .values(
        deleted_at=bindparam("at"),
        updated_at=bindparam("at"),
        version=col(Task.version) + 1,
        claimed_by=None,
        claim_expires_at=None,
    ),
    lambda changed: audit.entry_of(changed, AuditAction.DELETED),
    _with_project,
)


async def soft_delete_task(
    session: AsyncSession, call: Call, task_id: int, *, fencing_token: int | None = None
) -> TaskPublic:
    if (scope := call.permissions.projects) is not None:
        # Held locked from here, so the task cannot be moved out of scope before it is deleted.
        await find(session, task_id, scope=scope, to_change=True)
    now = utcnow()
    params = {"task_id": task_id, "given_fencing_token": fencing_token}
    params |= audit.entry_params(call, now, {"deleted_at": None}, {"deleted_at": now})
    task = await db.run_one_change(session, _DELETED, params)
    if task is None:
        found = await find(session, task_id, scope=call.permissions.projects)  # missing: says so
        if found.deleted_at is not None:
            # Deleted already: the tool is idempotent, so a repeat changes nothing and says how it is.
            return public(found)
        check_claim(found, call, fencing_token, now)  # held by another, or a stale token: says so
        raise ConflictError(f"task {task_id} changed while it was being deleted; nothing was changed, retry")
    return public(task)


async def restore_task(session: AsyncSession, call: Call, task_id: int) -> TaskPublic:
    task = await find(session, task_id, scope=call.permissions.projects, to_change=True)
    if task.deleted_at is None:
        return public(task)  # live already: a repeat, which changes nothing
    if not await projects.is_live(session, cast(int, task.project_id)):
        raise ConflictError(
            f"task {task_id} is in project {task.project_id}, which is deleted; restore_project brings "
            "it back with the tasks its deletion deleted, and then this one can be restored; nothing "
            "was changed"
        )
    now = utcnow()
    old = {"deleted_at": task.deleted_at}
    task.deleted_at, task.updated_at = None, now
    session.add(audit.entry(call, AuditAction.RESTORED, now, task, old, {"deleted_at": None}))
    return await flush(session, task)


async def update_task(
    session: AsyncSession,
    call: Call,
    task_id: int,
    changes: TaskUpdate,
    *,
    expected_version: int | None = None,
    fencing_token: int | None = None,
) -> TaskPublic:
    requested = changes.model_dump(exclude_none=True)
    if not requested:
        raise InvalidInputError(
            "give at least one field to change: title, description, status, priority, project_id"
        )
    task = live(await find(session, task_id, scope=call.permissions.projects, to_change=True))
    now = utcnow()
    check_claim(task, call, fencing_token, now)
    if expected_version is not None and task.version != expected_version:
        raise ConflictError(
            f"task {task_id} is at version {task.version}, not {expected_version}: it changed after you "
            "read it, and nothing was changed. Decide again from the current task: "
            + to_json(public(task)).decode()
        )
    old, new = audit.diff(snapshot(task), {key: audit.json_value(value) for key, value in requested.items()})
    if not new:
        return public(task)
    if new.get("status") in graph.NEEDS_UNBLOCKED:
        await _refuse_if_blocked(session, task_id, new["status"])
    await change_fields(session, call, task, {name: requested[name] for name in new})
    task.updated_at = now
    session.add(audit.entry(call, AuditAction.UPDATED, now, task, old, new))
    shown = await flush(session, task)
    if new.get("status") in FINISHED:
        shown["unblocked"] = await graph.unblocked_by(session, task_id)
    return shown


async def change_fields(session: AsyncSession, call: Call, task: Task, values: Mapping[str, Any]) -> None:
    """Set the task's fields to `values`, by name, with what follows from them: a new project
    (live, and within the caller's scope) loaded with it, the title's duplicate-guard key, and a
    finished task's claim let go (finished work is nobody's to hold)."""
    if "project_id" in values:
        project = await projects.load_live(session, values["project_id"], call.permissions.projects)
        set_committed_value(task, "project", project)
    for name, value in values.items():
        setattr(task, name, value)
    if "title" in values:
        task.title_key = titles.key(task.title)
    if values.get("status") in FINISHED:
        release(task)


async def _refuse_if_blocked(session: AsyncSession, task_id: int, status: str) -> None:
    waiting_for = await graph.blockers(session, task_id, unfinished_only=True)
    if waiting_for:
        listed = "; ".join(f"{b['id']} {b['title']!r} ({b['status']})" for b in waiting_for[:20])
        raise ConflictError(
            f"task {task_id} cannot be {status} yet: it waits for {len(waiting_for)} unfinished "
            f"task(s): {listed}. Finish those first, or remove_dependency; nothing was changed"
        )


# --- bulk changes: a status for many tasks, or deleting many tasks ----------------------------
#
# Both are set-based. On PostgreSQL one statement, as a plain application would write it: lock the
# tasks that change, update them, insert their entries, and return the first ids with the count.
# On SQLite, which has no data-modifying CTE, three (`_bulk_in_steps`). Both leave alone a task
# another agent holds a live claim on, and reach only the caller's projects (`_target`). More
# than the caller's max_bulk_rows changing tasks refuses the whole call (the caller rolls back).
# The call's progress hears of the start and of each step as it ends.

STATUS = "status"
DELETE = "delete"
MOVE = "move"
RESTORE = "restore"


async def bulk_update_status(
    session: AsyncSession,
    call: Call,
    status: TaskStatus,
    *,
    filter: FilterTree | None,
    task_ids: Sequence[int] | None,
) -> BulkUpdateResult:
    """Set `status` on every live matching task, with one audit entry per task changed."""
    shape, params = await _status_target(session, call, status, filter=filter, task_ids=task_ids)
    changed, ids = await _run_bulk(session, call, _bulk_statements(shape, STATUS), params)
    result = {"status": status, "dry_run": False, **_changed(changed, ids), "request_id": call.request_id}
    return cast(BulkUpdateResult, result)


async def bulk_delete_tasks(
    session: AsyncSession, call: Call, *, filter: FilterTree | None, task_ids: Sequence[int] | None
) -> BulkDeleteResult:
    """Soft-delete every live matching task, with one audit entry per task deleted (as
    soft_delete_task writes it); a deleted task's claim ends with it."""
    shape, params = await _target(session, call, filter=filter, task_ids=task_ids)
    params |= _deletion(params["at"])
    changed, ids = await _run_bulk(session, call, _bulk_statements(shape, DELETE), params)
    return cast(BulkDeleteResult, {"dry_run": False, **_changed(changed, ids), "request_id": call.request_id})


async def delete_project_tasks(session: AsyncSession, call: Call, project_id: int, at: datetime) -> int:
    """Soft-delete every live task of a project at `at`, as bulk_delete_tasks does (for delete_project)."""
    params = _bulk_params(call) | {"f0": project_id, "at": at}
    statements = _bulk_statements(_IN_PROJECT, DELETE)
    changed, _ = await _run_bulk(session, call, statements, params | _deletion(at))
    return changed


async def move_project_tasks(session: AsyncSession, call: Call, project_id: int, to: int) -> int:
    """Move every live task of a project to project `to`, set-based, one audit entry each (for
    delete_project)."""
    params = _bulk_params(call) | {"f0": project_id, "target_project": to}
    params |= {"audit_old": {"project_id": project_id}, "audit_new": {"project_id": to}}
    changed, _ = await _run_bulk(session, call, _bulk_statements(_IN_PROJECT, MOVE), params)
    return changed


async def restore_project_tasks(
    session: AsyncSession, call: Call, project_id: int, deleted_by: str, deleted_at: datetime
) -> int:
    """Restore the tasks of the project that the call `deleted_by` (a request id) deleted and that
    nothing changed since (for restore_project), set-based, one audit entry each."""
    params = _bulk_params(call) | {"deleted_by_request": deleted_by, "restoring_project": project_id}
    params |= {"audit_old": {"deleted_at": iso_time(deleted_at)}, "audit_new": {"deleted_at": None}}
    changed, _ = await _run_bulk(session, call, _bulk_statements(None, RESTORE), params)
    return changed


async def held_by_others(session: AsyncSession, call: Call, project_id: int) -> list[tuple[int, str]]:
    """The live tasks of a project another agent holds a live claim on (the first 20): id, holder."""
    params = {"project_id": project_id, CLAIMS_NOW: utcnow(), "claimer": call.agent_id}
    return [
        (row["id"], row["holder"])
        for row in db.named_rows(await session.exec(_HELD_BY_OTHERS, params=params))
    ]


_IN_PROJECT: Shape = (FilterField.PROJECT_ID, Operator.EQ, None)
_HELD_BY_OTHERS = (
    select(Task.id, LIVE_HOLDER.label("holder"))
    .where(
        col(Task.project_id) == bindparam("project_id"),
        LIVE_HOLDER.is_not(None),
        bindparam("claimer", type_=String) != LIVE_HOLDER,
    )
    .order_by(col(Task.id))
    .limit(20)
)


async def preview_status_change(
    session: AsyncSession,
    call: Call,
    status: TaskStatus,
    *,
    filter: FilterTree | None,
    task_ids: Sequence[int] | None,
) -> BulkUpdateResult:
    """What bulk_update_status would change, read without locking, changing or auditing anything."""
    shape, params = await _status_target(session, call, status, filter=filter, task_ids=task_ids)
    changes = await _preview(session, _bulk_statements(shape, STATUS), params)
    return cast(BulkUpdateResult, {"status": status, "dry_run": True, **changes})  # no request_id


async def preview_deletion(
    session: AsyncSession, call: Call, *, filter: FilterTree | None, task_ids: Sequence[int] | None
) -> BulkDeleteResult:
    """What bulk_delete_tasks would delete, read without locking, changing or auditing anything."""
    shape, params = await _target(session, call, filter=filter, task_ids=task_ids)
    changes = await _preview(session, _bulk_statements(shape, DELETE), params)
    return cast(BulkDeleteResult, {"dry_run": True, **changes})  # no request_id


async def propose(
    session: AsyncSession,
    call: Call,
    changeset_id: str,
    operation: str,
    *,
    status: TaskStatus | None,
    filter: FilterTree | None,
    task_ids: Sequence[int] | None,
) -> int:
    """Write the items of changeset `changeset_id`: the tasks the bulk `operation` (STATUS with
    `status`, or DELETE) would change now, each at the version read, with its before and after;
    in one INSERT ... SELECT, without locking or changing a task. How many."""
    if operation == STATUS:
        assert status is not None
        shape, params = await _status_target(session, call, status, filter=filter, task_ids=task_ids)
    else:
        shape, params = await _target(session, call, filter=filter, task_ids=task_ids)
        params |= {"item_before": {"deleted": False}, "item_after": {"deleted": True}}
    written = await session.exec(
        _bulk_statements(shape, operation).proposal,
        params=params | {"changeset_id": changeset_id},
        execution_options=db.RAW,
    )
    return int(written.rowcount)


class _Changes(TypedDict):
    changed_count: int
    changed_ids: list[int]
    changed_ids_truncated: bool


def _changed(count: int, ids: Sequence[int]) -> _Changes:
    return {
        "changed_count": count,
        "changed_ids": list(ids[:MAX_CHANGED_IDS]),
        "changed_ids_truncated": len(ids) > MAX_CHANGED_IDS,
    }


async def _preview(session: AsyncSession, statements: _BulkStatements, params: dict[str, Any]) -> _Changes:
    # The statements say themselves that only live tasks change.
    count = (await session.exec(statements.counting, params=params, execution_options=INCLUDE_DELETED)).one()
    ids = (await session.exec(statements.first_ids, params=params, execution_options=INCLUDE_DELETED)).all()
    return {
        "changed_count": count,
        "changed_ids": [id for id in ids if id is not None],
        "changed_ids_truncated": count > MAX_CHANGED_IDS,
    }


def _deletion(at: datetime) -> dict[str, Any]:
    """The values a deletion's entries bind: the same before and after as soft_delete_task's."""
    return {"audit_old": {"deleted_at": None}, "audit_new": {"deleted_at": iso_time(at)}}


async def _run_bulk(
    session: AsyncSession, call: Call, statements: _BulkStatements, params: dict[str, Any]
) -> tuple[int, list[int]]:
    """Run a bulk change: how many tasks changed, and the first MAX_CHANGED_IDS + 1 ids. An agent
    with max_bulk_rows has the tasks counted first, and is refused before anything is locked or
    written (the count after the change stays, for what started to match in between)."""
    if call.permissions.max_bulk_rows is not None:
        counted = await session.exec(statements.counting, params=params, execution_options=INCLUDE_DELETED)
        check_bulk_rows(call, counted.one())
    if session.get_bind().dialect.name != "postgresql":
        return await _bulk_in_steps(session, call, statements, params)
    await call.progress(0, 1, "changing the tasks and writing their audit entries")
    # The statement says itself that only live tasks change.
    found = await session.exec(statements.combined, params=params, execution_options=INCLUDE_DELETED)
    rows = db.named_rows(found)
    changed = rows[0]["changed_count"] if rows else 0
    check_bulk_rows(call, changed)
    await call.progress(1, 1, f"{changed:,} tasks changed and audited; committing")
    return changed, [row["entity_id"] for row in rows]


async def _bulk_in_steps(
    session: AsyncSession, call: Call, statements: _BulkStatements, params: dict[str, Any]
) -> tuple[int, list[int]]:
    """SQLite's bulk change, which has no data-modifying CTE: the audit entries, then the tasks
    they name, then the ids; safe in steps since a writer holds the file's lock throughout. How
    many tasks changed, and the first ids."""
    await call.progress(0, BULK_STEPS, "finding the tasks to change and writing their audit entries")
    written = await session.exec(statements.record, params=params, execution_options=db.RAW)
    check_bulk_rows(call, written.rowcount)
    await call.progress(1, BULK_STEPS, f"{written.rowcount:,} audit entries written; updating the tasks")
    updated = await session.exec(
        statements.update, params=params, execution_options={"synchronize_session": False}
    )
    await call.progress(2, BULK_STEPS, f"{updated.rowcount:,} tasks updated; listing their ids")
    ids = (await session.exec(_CHANGED_IDS, params=params)).all()
    await call.progress(BULK_STEPS, BULK_STEPS, "done; committing")
    return updated.rowcount, [id for id in ids if id is not None]


def check_bulk_rows(call: Call, count: int) -> None:
    """More than the caller's max_bulk_rows changing tasks refuses the whole call (the caller rolls back)."""
    if (max_rows := call.permissions.max_bulk_rows) is not None and count > max_rows:
        raise PermissionDeniedError(
            "max_bulk_rows",
            f"this call would change {count} tasks, and you may change at most {max_rows} in one bulk "
            "change (permission max_bulk_rows); nothing was changed. Narrow the filter or split the work",
        )


_THIS_CALL = select(AuditEntry.entity_id).where(AuditEntry.request_id == bindparam("audit_request_id"))
FINISHED = frozenset({TaskStatus.COMPLETED.value, TaskStatus.CANCELLED.value})
_TARGET_STATUS = bindparam("target_status", type_=String)
_FINISHING = _TARGET_STATUS.in_(sorted(FINISHED))
_NEEDS_UNBLOCKED = bindparam("target_status", type_=String).in_(graph.NEEDS_UNBLOCKED)
# What each bulk change sets, besides the version.
_NEW_VALUES: dict[str, dict[str, Any]] = {
    STATUS: {
        "status": bindparam("target_status", type_=String),
        "updated_at": bindparam("at"),
        # Finished work is nobody's to hold: a bulk completion lets go of the tasks' claims.
        "claimed_by": case((_FINISHING, None), else_=col(Task.claimed_by)),
        "claim_expires_at": case((_FINISHING, None), else_=col(Task.claim_expires_at)),
    },
    DELETE: {
        "deleted_at": bindparam("at"),
        "updated_at": bindparam("at"),
        "claimed_by": None,
        "claim_expires_at": None,
    },
    RESTORE: {"deleted_at": None, "updated_at": bindparam("at")},
    MOVE: {
        "project_id": bindparam("target_project", type_=ENTITY_TABLE.c.project_id.type),
        "updated_at": bindparam("at"),
    },
}
# The audit action of each bulk change whose entries bind their before and after (audit.bound_changed).
_BOUND_ACTION = {DELETE: AuditAction.DELETED, MOVE: AuditAction.UPDATED, RESTORE: AuditAction.RESTORED}
# What restore_project brings back: the tasks of the project (bound as restoring_project) whose
# latest change is their deletion by the project's deletion (bound as deleted_by_request). A task
# restored, moved or deleted again since is another call's to answer for.
_DELETION, _LATER = AUDIT_TABLE.alias("deletion"), AUDIT_TABLE.alias("later")
_DELETED_BY_REQUEST = and_(
    col(Task.project_id) == bindparam("restoring_project"),
    exists().where(
        _DELETION.c.entity_id == col(Task.id),
        _DELETION.c.request_id == bindparam("deleted_by_request", type_=String),
        _DELETION.c.action == AuditAction.DELETED.value,
        ~exists().where(_LATER.c.entity_id == _DELETION.c.entity_id, _LATER.c.id > _DELETION.c.id),
    ),
)
_CHANGED_IDS = _THIS_CALL.order_by(col(AuditEntry.entity_id)).limit(MAX_CHANGED_IDS + 1)


class _BulkStatements(NamedTuple):
    combined: Any  # PostgreSQL: lock, change and record in one statement; the first ids, the count
    record: Any  # SQLite: the audit entries of the tasks that change
    update: Any  # SQLite: the change of the tasks those entries name
    counting: SelectOfScalar[int]  # how many would change
    first_ids: SelectOfScalar[int] | SelectOfScalar[None]  # the first MAX_CHANGED_IDS of them
    proposal: Any  # the changeset items of those that would change: id, version, before, after


@lru_cache(maxsize=256)
def _bulk_statements(shape: Shape | None, operation: str) -> _BulkStatements:
    """The statements of a bulk `operation` (STATUS, DELETE, MOVE) over the live tasks a filter of
    this shape matches (None: the tasks listed in task_ids); for a status, less those already in it.
    RESTORE: the tasks of a project its deletion deleted, untouched since (_DELETED_BY_REQUEST)."""
    if operation == RESTORE:
        conditions = [_DELETED_BY_REQUEST, col(Task.deleted_at).is_not(None)]
    else:
        conditions = [
            one_of(col(Task.id), "task_ids") if shape is None else filters.clause(shape),
            col(Task.deleted_at).is_(None),
            # A task another agent holds a live claim on is left to its holder.
            or_(LIVE_HOLDER.is_(None), LIVE_HOLDER == bindparam("claimer", type_=String)),  # noqa: SIM300
        ]
    if operation == STATUS:
        conditions += [
            col(Task.status) != bindparam("target_status", type_=String),
            # A task that waits for unfinished work is not started or completed.
            or_(~_NEEDS_UNBLOCKED, ~graph.BLOCKED),
        ]
    changing = and_(*conditions)
    entity = ENTITY_TABLE
    # Locked in id order: two bulk changes over the same tasks then queue on the first one they
    # share, where in the order a scan met them (which differs by the row versions each snapshot
    # sees) they deadlocked.
    old = (
        sql_select(col(Task.id), col(Task.status))
        .where(changing)
        .order_by(col(Task.id))
        .with_for_update()
        .cte("old")
    )
    changed = (
        update(entity)
        .where(entity.c.id == old.c.id)
        .values(**_NEW_VALUES[operation], version=entity.c.version + 1)
        .returning(entity.c.id, old.c.status.label("old_status"))
        .cte("changed")
    )
    # A changeset item's before and after: the status, or (bound) whether the task is deleted.
    before_after = (
        (json_object(literal("status"), col(Task.status)), json_object(literal("status"), _TARGET_STATUS))
        if operation == STATUS
        else (bindparam("item_before", type_=JSONValue), bindparam("item_after", type_=JSONValue))
    )
    if operation == STATUS:
        entries, record = audit.status_changed(changed), audit.status_changes(changing)
    else:
        entries = audit.bound_changed(changed, _BOUND_ACTION[operation])
        record = audit.bound_changes(changing, _BOUND_ACTION[operation])
    written = entries.returning(col(AuditEntry.entity_id)).cte("written")
    combined = (
        sql_select(written.c.entity_id, func.count().over().label("changed_count"))
        .order_by(written.c.entity_id)
        .limit(MAX_CHANGED_IDS + 1)
    )
    return _BulkStatements(
        combined=combined,
        record=record,
        update=update(Task)
        .where(col(Task.id).in_(_THIS_CALL.scalar_subquery()))
        .values(**_NEW_VALUES[operation], version=Task.version + 1),
        counting=select(func.count()).select_from(Task).where(changing),
        first_ids=select(Task.id).where(changing).order_by(col(Task.id)).limit(MAX_CHANGED_IDS),
        proposal=insert(ChangesetItem).from_select(
            ["changeset_id", "task_id", "version", "before", "after"],
            sql_select(
                bindparam("changeset_id", type_=String), col(Task.id), col(Task.version), *before_after
            )
            .select_from(ENTITY_TABLE)
            .where(changing),
        ),
    )


def _bulk_params(call: Call) -> dict[str, Any]:
    """What every bulk statement binds besides the filter's values: who, when, and the time that
    decides which claims are live."""
    now = utcnow()
    return audit.call_params(call, now) | {CLAIMS_NOW: now, "claimer": call.agent_id}


async def _status_target(
    session: AsyncSession,
    call: Call,
    status: TaskStatus,
    *,
    filter: FilterTree | None,
    task_ids: Sequence[int] | None,
) -> tuple[Shape | None, dict[str, Any]]:
    """What a status change reaches (`_target`), with the status it sets bound."""
    shape, params = await _target(session, call, filter=filter, task_ids=task_ids)
    return shape, params | {"target_status": status.value}


async def _target(
    session: AsyncSession, call: Call, *, filter: FilterTree | None, task_ids: Sequence[int] | None
) -> tuple[Shape | None, dict[str, Any]]:
    """The shape of what a bulk change reaches (see _bulk_statements) and the values it binds:
    within the caller's projects (a filter is narrowed to them; a listed task outside is refused)."""
    if (filter is None) == (task_ids is None):
        raise InvalidInputError("give either filter or task_ids, not both and not neither")
    if task_ids is not None:
        await _require_live(session, task_ids, call.permissions.projects)
        shape, params = None, {"task_ids": list(task_ids)}
    else:
        assert filter is not None
        shape, params = scopes.narrow(call.permissions.projects, *filters.parse(filter))
    return shape, params | _bulk_params(call)


_LIVE_AMONG = select(Task.id, Task.project_id).where(one_of(col(Task.id), "task_ids"))


async def _require_live(session: AsyncSession, task_ids: Sequence[int], scope: Scope) -> None:
    """Every listed task is live and within `scope`, or the call is refused."""
    found = db.named_rows(await session.exec(_LIVE_AMONG, params={"task_ids": list(task_ids)}))
    missing = sorted(set(task_ids) - {row["id"] for row in found})
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise NotFoundError(f"these tasks do not exist or are deleted: {shown}; nothing was changed")
    if scope is not None and (outside := sorted({row["project_id"] for row in found} - scope)):
        raise PermissionDeniedError(
            ",".join(scopes.permission(project_id) for project_id in outside[:20]),
            "some of these tasks are in projects outside the ones you may use: "
            f"{', '.join(map(str, outside[:20]))} (permission {scopes.permission(outside[0])} is "
            "missing); nothing was changed",
        )
