"""Task data functions. Each takes the caller's session (and actor, when it writes) and never commits."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, update
from sqlalchemy import select as sql_select
from sqlalchemy.orm import joinedload
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import audit, filters, paging, projects
from mcp_server.audit import Actor
from mcp_server.errors import ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError
from mcp_server.filters import AllOf, AnyOf, Condition, Shape, compile_filter
from mcp_server.models import (
    ENTITY_TABLE,
    AuditAction,
    AuditEntry,
    EntityKind,
    Priority,
    Project,
    Task,
    TaskStatus,
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

# Reads select plain columns rather than mapped objects: a page of rows costs a fraction of a
# page of ORM instances, and the project's name comes from the same statement's join.
_entity = ENTITY_TABLE
_project = _entity.alias("project")
_IS_TASK = _entity.c.kind == EntityKind.TASK.value
_TASK_ROW = (
    *(_entity.c[name] for name in ("id", "title", "description", "status", "priority", "project_id")),
    _project.c.title.label("project_name"),
    *(_entity.c[name] for name in ("created_at", "updated_at", "deleted_at", "version")),
)


def _task_fields(row: Any) -> dict[str, Any]:
    """A row of _TASK_ROW as TaskPublic's fields, unpacked by position, so a whole page validates in
    one call: field by field through Row attributes costs more than the query itself."""
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
    return {
        "id": id,
        "title": title,
        "description": description,
        "status": status,
        "priority": priority,
        "project": {"id": project_id, "name": project_name},
        "created_at": created,
        "updated_at": updated,
        "deleted_at": deleted,
        "version": version,
    }


def _task_rows() -> Select[Any]:
    return (
        sql_select(*_TASK_ROW)
        .select_from(_entity.join(_project, _project.c.id == _entity.c.project_id))
        .where(_IS_TASK)
    )


# Sortable field -> (column, its value as JSON in a page token, and back).
_SORTABLE: dict[str, tuple[Any, Any, Any]] = {
    "created_at": (_entity.c.created_at, datetime.isoformat, paging.load_time),
    "updated_at": (_entity.c.updated_at, datetime.isoformat, paging.load_time),
    "title": (_entity.c.title, str, str),
    "priority": (_entity.c.priority, lambda p: Priority(p).value, Priority),
    "id": (_entity.c.id, int, int),
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


def _with_project() -> Any:
    return joinedload(Task.project, innerjoin=True)


# Searches that differ only in their values share one statement, built on first use and kept:
# the filter's shape, the order, include_deleted and whether it is a first page decide the SQL.
@lru_cache(maxsize=512)
def _search_statement(
    shape: Shape | None, order: SortOrder, include_deleted: bool, first: bool
) -> Select[Any]:
    return paging.paged(
        _task_rows().where(*_conditions(shape, include_deleted)), _sort_keys(order), first=first
    )


@lru_cache(maxsize=512)
def _count_statement(shape: Shape | None, include_deleted: bool) -> Select[Any]:
    """How many tasks match, counting no further than COUNT_CAP: a page stays cheap however many match."""
    matching = sql_select(_entity.c.id).where(_IS_TASK, *_conditions(shape, include_deleted))
    return sql_select(func.count()).select_from(matching.limit(COUNT_CAP + 1).subquery())


async def search_tasks(
    session: AsyncSession,
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
    keys = _sort_keys(order)
    page = await paging.fetch_page(
        session,
        _search_statement(shape, order, include_deleted, page_token is None),
        keys,
        params=params,
        limit=limit,
        page_token=page_token,
        query=paging.fingerprint(shape, params, order, include_deleted),
    )
    total = total_exact = None
    if include_total:
        counted = (await session.scalar(_count_statement(shape, include_deleted), params)) or 0
        total, total_exact = min(counted, COUNT_CAP), counted <= COUNT_CAP
    return TaskPage.model_validate(
        {
            "items": [_task_fields(row) for row in page.rows],
            "has_more": page.has_more,
            "next_page_token": page.next_page_token,
            "total": total,
            "total_exact": total_exact,
        }
    )


def _conditions(shape: Shape | None, include_deleted: bool) -> list[ColumnElement[bool]]:
    conditions = [] if shape is None else [filters.clause(shape)]
    if not include_deleted:
        conditions.append(_entity.c.deleted_at.is_(None))
    return conditions


async def get_task(session: AsyncSession, task_id: int) -> TaskPublic:
    return TaskPublic.of(await _load(session, task_id, deleted=False))


async def _load(session: AsyncSession, task_id: int, *, deleted: bool | None, lock: bool = False) -> Task:
    """The task with its project; `deleted` says whether it must be deleted (None: either)."""
    statement = select(Task).where(Task.id == task_id).options(_with_project())
    if lock:
        statement = statement.with_for_update(of=Task)
    task = (await session.exec(statement)).one_or_none()
    if task is None:
        raise NotFoundError(
            f"task {task_id} does not exist; search_tasks finds tasks by title or other fields"
        )
    if deleted is False and task.deleted_at is not None:
        raise NotFoundError(
            f"task {task_id} was deleted at {task.deleted_at.isoformat()}; restore_task brings it back"
        )
    if deleted is True and task.deleted_at is None:
        raise ConflictError(f"task {task_id} is not deleted; nothing to restore")
    return task


async def create_task(session: AsyncSession, actor: Actor, data: TaskCreate) -> TaskPublic:
    project = await projects.load_live(session, data.project_id)
    now = utcnow()
    task = Task(
        title=data.title,
        description=data.description,
        status=data.status,
        priority=data.priority,
        project_id=data.project_id,
        created_at=now,
        updated_at=now,
    )
    session.add(task)
    await session.flush()
    _attach_project(task, project)
    audit.record(session, actor, task, AuditAction.CREATED, at=now, old=None, new=audit.snapshot(task))
    return TaskPublic.of(task)


async def update_task(
    session: AsyncSession,
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
    task = await _load(session, task_id, deleted=False, lock=True)
    if expected_version is not None and task.version != expected_version:
        current = TaskPublic.of(task).model_dump_json()
        raise ConflictError(
            f"task {task_id} is at version {task.version}, not {expected_version}: it changed after you "
            f"read it, and nothing was changed. Decide again from the current task: {current}"
        )
    before = audit.snapshot(task)
    old, new = audit.diff(before, {key: audit.json_value(value) for key, value in requested.items()})
    if not new:
        return TaskPublic.of(task)
    if "project_id" in new:
        _attach_project(task, await projects.load_live(session, new["project_id"]))
    now = utcnow()
    for key, value in requested.items():
        if key in new:
            setattr(task, key, value)
    task.updated_at = now
    task.version += 1
    audit.record(session, actor, task, AuditAction.UPDATED, at=now, old=old, new=new)
    await session.flush()
    return TaskPublic.of(task)


async def soft_delete_task(session: AsyncSession, actor: Actor, task_id: int) -> TaskPublic:
    task = await _load(session, task_id, deleted=False, lock=True)
    now = utcnow()
    task.deleted_at = task.updated_at = now
    task.version += 1
    audit.record(
        session, actor, task, AuditAction.DELETED, at=now, old={"deleted_at": None}, new={"deleted_at": now}
    )
    await session.flush()
    return TaskPublic.of(task)


async def restore_task(session: AsyncSession, actor: Actor, task_id: int) -> TaskPublic:
    task = await _load(session, task_id, deleted=True, lock=True)
    now = utcnow()
    old = {"deleted_at": task.deleted_at}
    task.deleted_at = None
    task.updated_at = now
    task.version += 1
    audit.record(session, actor, task, AuditAction.RESTORED, at=now, old=old, new={"deleted_at": None})
    await session.flush()
    return TaskPublic.of(task)


async def bulk_update_status(
    session: AsyncSession,
    actor: Actor,
    status: TaskStatus,
    *,
    filter: FilterTree | None,
    task_ids: Sequence[int] | None,
    max_rows: int | None = None,
) -> BulkUpdateResult:
    """Set `status` on every live matching task, set-based: one INSERT ... SELECT writes the audit
    entries of exactly the tasks that change, then one UPDATE changes the tasks those entries name.

    More than `max_rows` changing tasks refuses the whole call (the caller rolls back).
    """
    changing = await _changing(session, status, filter=filter, task_ids=task_ids)
    now = utcnow()
    count = await audit.record_status_changes(session, actor, changing, status, at=now)
    if max_rows is not None and count > max_rows:
        raise PermissionDeniedError(
            "max_bulk_rows",
            f"this call would change {count} tasks, and you may change at most {max_rows} in one bulk "
            "update (permission max_bulk_rows); nothing was changed. Narrow the filter or split the work",
        )
    this_call = select(AuditEntry.entity_id).where(AuditEntry.request_id == actor.request_id)
    result = await session.exec(
        update(Task)
        .where(col(Task.id).in_(this_call))
        .values(status=status, updated_at=now, version=col(Task.version) + 1)
        .execution_options(synchronize_session=False)
    )
    changed_ids = list(
        (await session.exec(this_call.order_by(col(AuditEntry.entity_id)).limit(MAX_CHANGED_IDS + 1))).all()
    )
    return BulkUpdateResult(
        status=status,
        dry_run=False,
        changed_count=result.rowcount,
        changed_ids=[i for i in changed_ids[:MAX_CHANGED_IDS] if i is not None],
        changed_ids_truncated=len(changed_ids) > MAX_CHANGED_IDS,
        request_id=actor.request_id,
    )


async def preview_status_change(
    session: AsyncSession, status: TaskStatus, *, filter: FilterTree | None, task_ids: Sequence[int] | None
) -> BulkUpdateResult:
    """What bulk_update_status would change, read without locking, changing or auditing anything."""
    changing = await _changing(session, status, filter=filter, task_ids=task_ids)
    count = (await session.exec(select(func.count(col(Task.id))).where(changing))).one()
    ids = list(
        (
            await session.exec(select(Task.id).where(changing).order_by(col(Task.id)).limit(MAX_CHANGED_IDS))
        ).all()
    )
    return BulkUpdateResult(
        status=status,
        dry_run=True,
        changed_count=count,
        changed_ids=[i for i in ids if i is not None],
        changed_ids_truncated=count > MAX_CHANGED_IDS,
        request_id=None,
    )


async def _changing(
    session: AsyncSession, status: TaskStatus, *, filter: FilterTree | None, task_ids: Sequence[int] | None
) -> ColumnElement[bool]:
    """The live tasks a status change reaches, less those already in that status."""
    if (filter is None) == (task_ids is None):
        raise InvalidInputError("give either filter or task_ids, not both and not neither")
    matching: ColumnElement[bool]
    if task_ids is not None:
        await _require_live(session, task_ids)
        matching = col(Task.id).in_(task_ids)
    else:
        assert filter is not None
        matching = compile_filter(filter)
    return and_(matching, col(Task.deleted_at).is_(None), col(Task.status) != status)


async def _require_live(session: AsyncSession, task_ids: Sequence[int]) -> None:
    found = set(
        (
            await session.exec(
                select(Task.id).where(col(Task.id).in_(task_ids), col(Task.deleted_at).is_(None))
            )
        ).all()
    )
    missing = sorted(set(task_ids) - found)
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise NotFoundError(f"these tasks do not exist or are deleted: {shown}; nothing was changed")


def _attach_project(task: Task, project: Project) -> None:
    set_committed_value(task, "project", project)
