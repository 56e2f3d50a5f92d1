"""Task data functions. Each takes the call's connection (and actor, when it writes) and never commits.

Every statement here is SQLAlchemy Core over the entity table, built once and kept: a call binds
its values and runs it (see db.Conn). A task comes back with its project's name from the same
statement, so no read ever costs a second query per row.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache
from typing import Any, NamedTuple, cast

from pydantic_core import to_json
from sqlalchemy import (
    ColumnElement,
    FromClause,
    Insert,
    Select,
    SmallInteger,
    String,
    Update,
    and_,
    bindparam,
    func,
    insert,
    type_coerce,
    update,
)
from sqlalchemy import select as sql_select

from mcp_server import audit, filters, paging, projects
from mcp_server.audit import Actor
from mcp_server.db import Conn, Row, iso_text, one_of
from mcp_server.errors import ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError
from mcp_server.filters import AllOf, AnyOf, Condition, Shape
from mcp_server.models import (
    AUDIT_TABLE,
    ENTITY_TABLE,
    PRIORITY_NAME,
    AuditAction,
    EntityKind,
    Priority,
    TaskStatus,
    UTCDateTime,
    utcnow,
)
from mcp_server.schemas import (
    COUNT_CAP,
    BulkUpdateResult,
    OrderBy,
    TaskCreate,
    TaskPage,
    TaskPublic,
    TaskUpdate,
)

MAX_CHANGED_IDS = 500
DEFAULT_ORDER = (OrderBy(field="created_at", direction="desc"),)

FilterTree = Condition | AllOf | AnyOf

_entity = ENTITY_TABLE
_IS_TASK = _entity.c.kind == EntityKind.TASK.value
_LIVE = _entity.c.deleted_at.is_(None)
_TASK_ID = _entity.c.id == bindparam("task_id")


def _task_row(source: FromClause) -> Select[Any]:
    """A task as the tools show it, read from `source` (the entity table, or a row a statement just
    changed), with its project's name joined in: the columns `task_of` unpacks."""
    project = ENTITY_TABLE.alias("project")
    return sql_select(
        *(source.c[name] for name in ("id", "title", "description", "status")),
        type_coerce(source.c.priority, SmallInteger).label("priority"),  # the rank; task_of names it
        source.c.project_id,
        project.c.title.label("project_name"),
        *(iso_text(source.c[name]).label(name) for name in ("created_at", "updated_at", "deleted_at")),
        source.c.version,
    ).select_from(source.join(project, project.c.id == source.c.project_id))


def task_of(row: Any) -> TaskPublic:
    """A row of `_task_row` as a tool result, unpacked by position."""
    (
        id,
        title,
        description,
        status,
        priority,
        project_id,
        project_name,
        created,
        updated,
        deleted,
        version,
    ) = row
    task: TaskPublic = {
        "id": id,
        "title": title,
        "description": description,
        "status": status,
        "priority": cast(Priority, PRIORITY_NAME[priority]),  # its name: as JSON has it, and cheaper to send
        "project": {"id": project_id, "name": project_name},
        "created_at": created,
        "updated_at": updated,
        "version": version,
    }
    if deleted is not None:
        task["deleted_at"] = deleted
    return task


def snapshot(task: TaskPublic) -> dict[str, Any]:
    """The audited fields of a task, as its audit entries name them."""
    return {
        "title": task["title"],
        "description": task["description"],
        "status": audit.json_value(task["status"]),
        "priority": audit.json_value(task["priority"]),
        "project_id": task["project"]["id"],
    }


# Sortable field -> (column, its value in a row as JSON in a page token, and back to a value to
# compare the column with). Times are in rows as text already.
_SORTABLE: dict[str, tuple[Any, Any, Any]] = {
    "created_at": (_entity.c.created_at, str, paging.load_time),
    "updated_at": (_entity.c.updated_at, str, paging.load_time),
    "title": (_entity.c.title, str, str),
    "priority": (_entity.c.priority, PRIORITY_NAME.__getitem__, Priority),
    "id": (_entity.c.id, int, paging.load_id),
}


SortOrder = tuple[tuple[str, bool], ...]  # (field, descending), most significant first


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


def _conditions(shape: Shape | None, include_deleted: bool) -> list[ColumnElement[bool]]:
    conditions = [_IS_TASK] if shape is None else [_IS_TASK, filters.clause(shape)]
    if not include_deleted:
        conditions.append(_LIVE)
    return conditions


# Searches that differ only in their values share one statement, built on first use and kept:
# the filter's shape, the order, include_deleted, the page size and whether it is a first page
# decide the SQL.
@lru_cache(maxsize=512)
def _search_statement(
    shape: Shape | None, order: SortOrder, include_deleted: bool, first: bool, limit: int
) -> Select[Any]:
    statement = _task_row(_entity).where(*_conditions(shape, include_deleted))
    return paging.paged(statement, _sort_keys(order), first=first, limit=limit)


@lru_cache(maxsize=512)
def _count_statement(shape: Shape | None, include_deleted: bool) -> Select[Any]:
    """How many tasks match, counting no further than COUNT_CAP: a page stays cheap however many match."""
    matching = sql_select(_entity.c.id).where(*_conditions(shape, include_deleted))
    return sql_select(func.count()).select_from(matching.limit(COUNT_CAP + 1).subquery())


async def search_tasks(
    conn: Conn,
    *,
    filter: FilterTree | None,
    order_by: Sequence[OrderBy],
    limit: int,
    page_token: str | None,
    include_deleted: bool,
    include_total: bool,
) -> TaskPage:
    order: SortOrder = tuple((item.field, item.direction == "desc") for item in order_by or DEFAULT_ORDER)
    if len({field for field, _ in order}) != len(order):
        raise InvalidInputError("order_by names a field twice; give each field once")
    shape, params = (None, {}) if filter is None else filters.parse(filter)
    page = await paging.fetch_page(
        conn,
        _search_statement(shape, order, include_deleted, page_token is None, limit),
        _sort_keys(order),
        params=params,
        limit=limit,
        page_token=page_token,
        query=paging.fingerprint(shape, params, order, include_deleted),
    )
    result: TaskPage = {"items": [task_of(row) for row in page.rows], "has_more": page.has_more}
    if (token := page.next_page_token) is not None:
        result["next_page_token"] = token
    if include_total:
        counted = (await conn.row(_count_statement(shape, include_deleted), params) or (0,))[0]
        result["total"], result["total_exact"] = min(counted, COUNT_CAP), counted <= COUNT_CAP
    return result


_GET = _task_row(_entity).where(_TASK_ID, _IS_TASK)
_DELETED_AT = [column.key for column in _GET.exported_columns].index("deleted_at")
_GET_FOR_UPDATE = _GET.with_for_update(of=_entity)


async def get_task(conn: Conn, task_id: int) -> TaskPublic:
    return _live(await _find(conn, _GET, task_id))


async def _find(conn: Conn, statement: Select[Any], task_id: int) -> TaskPublic:
    return task_of(await _find_row(conn, statement, task_id))


async def _find_row(conn: Conn, statement: Select[Any], task_id: int) -> Row:
    row = await conn.row(statement, {"task_id": task_id})
    if row is None:
        raise NotFoundError(
            f"task {task_id} does not exist; search_tasks finds tasks by title or other fields"
        )
    return row


def _live(task: TaskPublic) -> TaskPublic:
    if (when := task.get("deleted_at")) is not None:
        raise NotFoundError(f"task {task['id']} was deleted at {when}; restore_task brings it back")
    return task


def _bind(name: str) -> Any:
    """A value of the column `name` as a parameter, converted as the column converts it."""
    return bindparam(f"new_{name}", type_=_entity.c[name].type)


# A new task, in one statement with its audit entry: the INSERT reads its project, so a missing or
# deleted project inserts nothing, and the entry is written from the inserted row.
_project = _entity.alias("project")
_CREATE = insert(_entity).from_select(
    [
        "kind",
        "title",
        "description",
        "status",
        "priority",
        "project_id",
        "created_at",
        "updated_at",
        "version",
    ],
    sql_select(
        bindparam("new_kind", EntityKind.TASK.value, type_=String),
        _bind("title"),
        _bind("description"),
        _bind("status"),
        _bind("priority"),
        _project.c.id,
        bindparam("at", type_=UTCDateTime()),
        bindparam("at", type_=UTCDateTime()),
        bindparam("new_version", 1),
    ).where(
        _project.c.id == bindparam("in_project"),
        _project.c.kind == EntityKind.PROJECT.value,
        _project.c.deleted_at.is_(None),
    ),
)


async def create_task(conn: Conn, actor: Actor, data: TaskCreate) -> TaskPublic:
    now = utcnow()
    new = {
        "title": data.title,
        "description": data.description,
        "status": data.status,
        "priority": data.priority,
        "project_id": data.project_id,
    }
    params = {f"new_{name}": value for name, value in new.items() if name != "project_id"}
    params |= {"in_project": data.project_id}
    row = await conn.change_one(
        _CREATE,
        audit.entry_of,
        _task_row,
        params | audit.entry(actor, AuditAction.CREATED, now, None, new),
    )
    if row is None:
        raise projects.not_live(data.project_id)
    return task_of(row)


_SOFT_DELETE = (
    update(_entity)
    .where(_TASK_ID, _IS_TASK, _LIVE)
    .values(deleted_at=bindparam("at"), updated_at=bindparam("at"), version=_entity.c.version + 1)
)
_RESTORE = (
    update(_entity)
    .where(_TASK_ID, _IS_TASK, _entity.c.deleted_at.is_not(None))
    .values(deleted_at=None, updated_at=bindparam("at"), version=_entity.c.version + 1)
)


async def soft_delete_task(conn: Conn, actor: Actor, task_id: int) -> TaskPublic:
    """One statement: the task, its audit entry and the result, or nothing when it is not live."""
    now = utcnow()
    row = await conn.change_one(
        _SOFT_DELETE,
        audit.entry_of,
        _task_row,
        {"task_id": task_id}
        | audit.entry(actor, AuditAction.DELETED, now, {"deleted_at": None}, {"deleted_at": now}),
    )
    if row is None:
        _live(await _find(conn, _GET, task_id))  # says why: missing, or deleted already
        raise ConflictError(f"task {task_id} changed while it was being deleted; nothing was changed, retry")
    return task_of(row)


async def restore_task(conn: Conn, actor: Actor, task_id: int) -> TaskPublic:
    deleted_at = (await _find_row(conn, _GET_FOR_UPDATE, task_id))[_DELETED_AT]
    if deleted_at is None:
        raise ConflictError(f"task {task_id} is not deleted; nothing to restore")
    now = utcnow()
    old, new = {"deleted_at": deleted_at}, {"deleted_at": None}
    row = await conn.change_one(
        _RESTORE,
        audit.entry_of,
        _task_row,
        {"task_id": task_id} | audit.entry(actor, AuditAction.RESTORED, now, old, new),
    )
    assert row is not None, "the task is locked since it was read"
    return task_of(row)


@lru_cache(maxsize=64)
def _update_statement(fields: tuple[str, ...]) -> Update:
    """An UPDATE of these fields of a live task, each bound as new_<field>."""
    values: dict[str, Any] = {name: _bind(name) for name in fields}
    return (
        update(_entity)
        .where(_TASK_ID, _IS_TASK, _LIVE)
        .values(**values, updated_at=bindparam("at"), version=_entity.c.version + 1)
    )


async def update_task(
    conn: Conn,
    actor: Actor,
    task_id: int,
    changes: TaskUpdate,
    *,
    expected_version: int | None = None,
) -> TaskPublic:
    requested = changes.model_dump(exclude_none=True)
    if not requested:
        raise InvalidInputError(
            "give at least one field to change: title, description, status, priority, project_id"
        )
    task = _live(await _find(conn, _GET_FOR_UPDATE, task_id))
    if expected_version is not None and task["version"] != expected_version:
        raise ConflictError(
            f"task {task_id} is at version {task['version']}, not {expected_version}: it changed after you "
            "read it, and nothing was changed. Decide again from the current task: " + to_json(task).decode()
        )
    old, new = audit.diff(snapshot(task), {key: audit.json_value(value) for key, value in requested.items()})
    if not new:
        return task
    if "project_id" in new:
        await projects.load_live(conn, new["project_id"])
    now = utcnow()
    params = {f"new_{name}": requested[name] for name in new} | {"task_id": task_id}
    row = await conn.change_one(
        _update_statement(tuple(sorted(new))),
        audit.entry_of,
        _task_row,
        params | audit.entry(actor, AuditAction.UPDATED, now, old, new),
    )
    assert row is not None, "the task is locked since it was read"
    return task_of(row)


Progress = Callable[[float, float | None, str], Awaitable[None]]
BULK_STEPS = 3


async def no_progress(done: float, total: float | None, message: str) -> None:
    """For a caller that asked for no progress."""


async def bulk_update_status(
    conn: Conn,
    actor: Actor,
    status: TaskStatus,
    *,
    filter: FilterTree | None,
    task_ids: Sequence[int] | None,
    max_rows: int | None = None,
    progress: Progress = no_progress,
) -> BulkUpdateResult:
    """Set `status` on every live matching task, set-based: one INSERT ... SELECT writes the audit
    entries of exactly the tasks that change, then one UPDATE changes the tasks those entries name.

    More than `max_rows` changing tasks refuses the whole call (the caller rolls back). `progress`
    hears of each of the three steps as it ends; the first, the audit entries, takes the longest.
    """
    shape, params = await _target(conn, status, filter=filter, task_ids=task_ids)
    now = utcnow()
    entry = audit.entry(actor, AuditAction.UPDATED, now, None, None)
    await progress(0, BULK_STEPS, "finding the tasks to change and writing their audit entries")
    count = await conn.execute(_bulk_statements(shape).record, params | entry)
    if max_rows is not None and count > max_rows:
        raise PermissionDeniedError(
            "max_bulk_rows",
            f"this call would change {count} tasks, and you may change at most {max_rows} in one bulk "
            "update (permission max_bulk_rows); nothing was changed. Narrow the filter or split the work",
        )
    await progress(1, BULK_STEPS, f"{count:,} audit entries written; updating the tasks")
    this_call = {"request_id": actor.request_id}
    changed = await conn.execute(_BULK_UPDATE, this_call | {"new_status": status.value, "at": now})
    await progress(2, BULK_STEPS, f"{changed:,} tasks updated; listing their ids")
    ids = [row[0] for row in await conn.rows(_CHANGED_IDS, this_call)]
    await progress(BULK_STEPS, BULK_STEPS, "done; committing")
    return {
        "status": status,
        "dry_run": False,
        "changed_count": changed,
        "changed_ids": ids[:MAX_CHANGED_IDS],
        "changed_ids_truncated": len(ids) > MAX_CHANGED_IDS,
        "request_id": actor.request_id,
    }


_audit = AUDIT_TABLE
_THIS_CALL = sql_select(_audit.c.entity_id).where(_audit.c.request_id == bindparam("request_id"))
_BULK_UPDATE = (
    update(_entity)
    .where(_entity.c.id.in_(_THIS_CALL.scalar_subquery()))
    .values(
        status=bindparam("new_status", type_=String),
        updated_at=bindparam("at"),
        version=_entity.c.version + 1,
    )
)
_CHANGED_IDS = _THIS_CALL.order_by(_audit.c.entity_id).limit(MAX_CHANGED_IDS + 1)


async def preview_status_change(
    conn: Conn, status: TaskStatus, *, filter: FilterTree | None, task_ids: Sequence[int] | None
) -> BulkUpdateResult:
    """What bulk_update_status would change, read without locking, changing or auditing anything."""
    shape, params = await _target(conn, status, filter=filter, task_ids=task_ids)
    statements = _bulk_statements(shape)
    count = (await conn.rows(statements.counting, params))[0][0]
    ids = await conn.rows(statements.first_ids, params)
    return {
        "status": status,
        "dry_run": True,
        "changed_count": count,
        "changed_ids": [row[0] for row in ids],
        "changed_ids_truncated": count > MAX_CHANGED_IDS,
    }


class _BulkStatements(NamedTuple):
    record: Insert  # the audit entries of the tasks that change, locking them
    counting: Select[Any]  # how many would change
    first_ids: Select[Any]  # the first MAX_CHANGED_IDS of them


@lru_cache(maxsize=256)
def _bulk_statements(shape: Shape | None) -> _BulkStatements:
    """The statements of a status change over the tasks a filter of this shape matches (None: the
    tasks listed in task_ids), less those already in the target status."""
    matching = one_of(_entity.c.id, "task_ids") if shape is None else filters.clause(shape)
    changing = and_(matching, _IS_TASK, _LIVE, _entity.c.status != bindparam("target_status", type_=String))
    return _BulkStatements(
        record=audit.status_changes(changing),
        counting=sql_select(func.count()).select_from(_entity).where(changing),
        first_ids=sql_select(_entity.c.id).where(changing).order_by(_entity.c.id).limit(MAX_CHANGED_IDS),
    )


async def _target(
    conn: Conn, status: TaskStatus, *, filter: FilterTree | None, task_ids: Sequence[int] | None
) -> tuple[Shape | None, dict[str, Any]]:
    """The shape of what a status change reaches (see _bulk_statements) and the values it binds."""
    if (filter is None) == (task_ids is None):
        raise InvalidInputError("give either filter or task_ids, not both and not neither")
    if task_ids is not None:
        await _require_live(conn, task_ids)
        shape, params = None, {"task_ids": list(task_ids)}
    else:
        assert filter is not None
        shape, params = filters.parse(filter)
    return shape, params | {"target_status": status.value}


_LIVE_AMONG = sql_select(_entity.c.id).where(one_of(_entity.c.id, "task_ids"), _IS_TASK, _LIVE)


async def _require_live(conn: Conn, task_ids: Sequence[int]) -> None:
    found = {row[0] for row in await conn.rows(_LIVE_AMONG, {"task_ids": list(task_ids)})}
    missing = sorted(set(task_ids) - found)
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise NotFoundError(f"these tasks do not exist or are deleted: {shown}; nothing was changed")
