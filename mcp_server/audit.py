"""The audit log: the entry of each change, written in the change's own transaction, and the trail."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Insert,
    RowMapping,
    String,
    and_,
    bindparam,
    insert,
    literal,
    or_,
)
from sqlalchemy import select as sql_select  # a Core SELECT of nine columns, inserted as it is
from sqlalchemy.orm import QueryableAttribute
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import Select

from mcp_server import chain, db, paging, scopes
from mcp_server.errors import NotFoundError
from mcp_server.identity import Call
from mcp_server.models import (
    AuditAction,
    AuditEntry,
    Entity,
    EntityKind,
    JSONValue,
    Task,
    UTCDateTime,
    utcnow,
)
from mcp_server.schemas import AuditEntryPublic, AuditTrail, EntityRef, iso_time
from mcp_server.scopes import Scope
from mcp_server.sql import iso_text, json_object, one_of

MAX_RECORDED_ARGUMENTS = 20_000


def json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_time(value)
    return value.value if isinstance(value, Enum) else value


def diff(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The before and after of just the keys whose values differ."""
    changed = [key for key in new if old.get(key) != new[key]]
    return {key: old.get(key) for key in changed}, {key: new[key] for key in changed}


def _values(values: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if values is None else {key: json_value(value) for key, value in values.items()}


def entry(
    call: Call,
    action: AuditAction,
    at: datetime,
    entity: Entity | None,
    old: dict[str, Any] | None,
    new: dict[str, Any] | None,
) -> AuditEntry:
    """The entry of a change to `entity` (none for a refusal), made by `call` at `at` (the time
    the change itself records): added to the session, it is written with the change, at the
    flush, and the database seals it into the chain (see chain.py)."""
    return AuditEntry(
        entity=entity,
        entity_type=None if entity is None else entity.kind,
        action=action,
        changed_by=call.agent_id,
        client_name=call.client_name,
        changed_at=at,
        request_id=call.request_id,
        old_value=_values(old),
        new_value=_values(new),
    )


def record_refusal(
    session: AsyncSession, call: Call, permission: str, arguments: Any, repeated_before: int = 0
) -> None:
    """A call refused for want of a permission: who tried which tool with what, and what was
    missing; and how often the same was refused in the previous window (refusals.py), if at all."""
    if len(json.dumps(arguments, default=str)) > MAX_RECORDED_ARGUMENTS:
        arguments = {"omitted": f"the arguments were longer than {MAX_RECORDED_ARGUMENTS} characters"}
    refused: dict[str, Any] = {"tool": call.tool, "missing_permission": permission, "arguments": arguments}
    if repeated_before:
        refused["repeated_before"] = repeated_before
    session.add(entry(call, AuditAction.REFUSED, utcnow(), None, None, refused))


# The columns a set-based statement writes, in the order of its SELECT: the content an entry's
# hash covers, after its id and transaction (which the database assigns).
_WRITTEN = chain.CONTENT


def entry_of(changed: FromClause, action: AuditAction) -> Insert:
    """The audit entry of the changed row `changed` (a whole row of the entity table, see
    db.one_change). Who, when and the values before and after are bound (see `entry_params`)."""
    return insert(AuditEntry).from_select(
        list(_WRITTEN), sql_select(*_bound_entry(changed.c.id, changed.c.kind, action))
    )


def entry_params(
    call: Call, at: datetime, old: dict[str, Any] | None, new: dict[str, Any] | None
) -> dict[str, Any]:
    """The values `entry_of` binds."""
    return call_params(call, at) | {"audit_old": _values(old), "audit_new": _values(new)}


def status_changes(matching: ColumnElement[bool]) -> Any:
    """One entry per task matching `matching`, with its old status and the new one (bound as
    target_status), in a single INSERT ... SELECT; who, when and which call are bound as
    audit_changed_by, audit_client_name, at and audit_request_id (see `call_params`).

    On PostgreSQL the SELECT locks the rows it reads (FOR UPDATE), so the old status recorded is
    the one the following UPDATE overwrites, even with concurrent writers.
    """
    source = sql_select(*_status_entry(col(Task.id), Task.status)).where(matching).with_for_update()
    return insert(AuditEntry).from_select(list(_WRITTEN), source)


def status_changed(changed: FromClause) -> Insert:
    """One entry per row of `changed`, a task's `id` and the `old_status` it had, with the new
    status bound as target_status; who, when and which call bound as in `status_changes`."""
    source = sql_select(*_status_entry(changed.c.id, changed.c.old_status))
    return insert(AuditEntry).from_select(list(_WRITTEN), source)


def bound_changes(matching: ColumnElement[bool], action: AuditAction) -> Any:
    """As `status_changes`, one entry per task matching `matching`, of `action`, with the same
    before and after for every task, bound as audit_old and audit_new (a bulk deletion's, or a
    move out of one project)."""
    source = sql_select(*_bound_entry(col(Task.id), literal(EntityKind.TASK.value), action))
    source = source.where(matching).with_for_update()
    return insert(AuditEntry).from_select(list(_WRITTEN), source)


def bound_changed(changed: FromClause, action: AuditAction) -> Insert:
    """As `status_changed`, one entry per row of `changed` (its `id`), with before and after bound
    as in `bound_changes`."""
    source = sql_select(*_bound_entry(changed.c.id, literal(EntityKind.TASK.value), action))
    return insert(AuditEntry).from_select(list(_WRITTEN), source)


def _bound_entry(entity_id: Any, kind: Any, action: AuditAction) -> tuple[Any, ...]:
    """The values of an entry of `action` whose who, when, before and after are bound (see
    `entry_params`), in the order of _WRITTEN."""
    return (
        entity_id,
        kind,
        literal(action.value),
        bindparam("audit_changed_by", type_=String),
        bindparam("audit_client_name", type_=String),
        bindparam("at", type_=UTCDateTime()),
        bindparam("audit_request_id", type_=String),
        bindparam("audit_old", type_=JSONValue),
        bindparam("audit_new", type_=JSONValue),
    )


def _status_entry(task_id: Any, old_status: Any) -> tuple[Any, ...]:
    """The values of a status change's entry, in the order of _WRITTEN."""
    return (
        task_id,
        literal(EntityKind.TASK.value),
        literal(AuditAction.UPDATED.value),
        bindparam("audit_changed_by", type_=String),
        bindparam("audit_client_name", type_=String),
        bindparam("at", type_=UTCDateTime()),
        bindparam("audit_request_id", type_=String),
        json_object(literal("status"), old_status),
        json_object(literal("status"), bindparam("target_status", type_=String)),
    )


def call_params(call: Call, at: datetime) -> dict[str, Any]:
    """The values `status_changes` binds for who, when and which call."""
    return {
        "audit_changed_by": call.agent_id,
        "audit_client_name": call.client_name,
        "at": at,
        "audit_request_id": call.request_id,
    }


# --- the trail ---------------------------------------------------------------------------------

_TRAIL_KEYS = (  # a row of _ENTRY_ROW holds its time as text already
    paging.SortKey("changed_at", AuditEntry.changed_at, True, str, paging.load_time),
    paging.SortKey("id", AuditEntry.id, True, int, paging.load_id),
)

# Each narrowing the trail can take: its column, and how the column compares with the value.
_NARROWING: dict[str, tuple[Any, Callable[[Any, Any], ColumnElement[bool]]]] = {
    "entity_id": (AuditEntry.entity_id, operator.eq),
    "request_id": (AuditEntry.request_id, operator.eq),
    "changed_by": (AuditEntry.changed_by, operator.eq),
    "action": (AuditEntry.action, operator.eq),
    "since": (AuditEntry.changed_at, operator.ge),
    "until": (AuditEntry.changed_at, operator.lt),
}


# A page of the trail is read as named rows, its time as text in the tools' format (sql.iso_text):
# about 1 ms less for fifty entries than as AuditEntry objects (bench/profile.py has the same for
# tasks), and a page only shows them.
_ENTRY_ROW = tuple(
    iso_text(AuditEntry.changed_at).label(name) if name == "changed_at" else getattr(AuditEntry, name)
    for name in AuditEntryPublic.__annotations__
)


@lru_cache(maxsize=256)
def _trail_statement(narrowed_by: tuple[str, ...], first: bool, limit: int) -> Select[*tuple[Any, ...]]:
    """The trail's page for a set of narrowings, built once and kept (see paging.paged). Narrowed
    to one entity, each row brings that entity along too (`Entity`), loaded as its own class."""
    conditions = [
        compare(column, bindparam(name, type_=column.type))
        for name in narrowed_by
        if name != "scope"
        for column, compare in [_NARROWING[name]]
    ]
    if "scope" in narrowed_by:
        conditions.append(col(AuditEntry.entity_id).in_(_IN_SCOPE))
    statement: Select[*tuple[Any, ...]] = Select(*_ENTRY_ROW)
    if "entity_id" in narrowed_by:
        statement = Select(Entity, *_ENTRY_ROW).join_from(AuditEntry, Entity, _ENTITY)
    return paging.paged(statement.where(*conditions), _TRAIL_KEYS, first=first, limit=limit)


_ENTITY = cast(QueryableAttribute[Entity], AuditEntry.entity)  # SQLModel types it as the value
# The entities of the projects bound as `scope`, deleted or not: the projects and their tasks.
_IN_SCOPE = select(Entity.id).where(
    or_(
        one_of(col(Entity.project_id), "scope"),
        and_(col(Entity.kind) == EntityKind.PROJECT.value, one_of(col(Entity.id), "scope")),
    )
)


def _entry_public(entry: RowMapping, *, with_entity: bool) -> AuditEntryPublic:
    """A row of _ENTRY_ROW as the trail shows it, read by name; its entity's id only `with_entity`."""
    public: AuditEntryPublic = {
        "id": entry["id"],
        "action": entry["action"],
        "changed_by": entry["changed_by"],
        "changed_at": entry["changed_at"],
        "request_id": entry["request_id"],
    }
    if with_entity and (entity_id := entry["entity_id"]) is not None:
        public["entity_id"] = entity_id
    if (client_name := entry["client_name"]) is not None:
        public["client_name"] = client_name
    if (old_value := entry["old_value"]) is not None:
        public["old_value"] = old_value
    if (new_value := entry["new_value"]) is not None:
        public["new_value"] = new_value
    return public


def _entity_ref(entity: Entity) -> EntityRef:
    assert entity.id is not None, "a loaded entity has its id"
    return {
        "id": entity.id,
        "type": EntityKind(entity.kind),
        "name": entity.title,
        "deleted": entity.deleted_at is not None,
    }


async def get_audit_trail(
    session: AsyncSession,
    *,
    entity_id: int | None,
    request_id: str | None,
    changed_by: str | None,
    action: AuditAction | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    page_token: str | None,
    scope: Scope,
) -> AuditTrail:
    """A page of the audit trail, newest first. A scoped agent sees the entries of its projects and
    their tasks only; an entity outside them is refused."""
    if entity_id is not None and scope is not None:
        named = await session.get(Entity, entity_id)
        if named is not None:
            project_id = named.id if named.kind == EntityKind.PROJECT.value else named.project_id
            scopes.require(scope, cast(int, project_id), f"{named.kind} {entity_id}")
    given = {"entity_id": entity_id, "request_id": request_id, "changed_by": changed_by, "action": action}
    params: dict[str, Any] = {
        name: value for name, value in (given | {"since": since, "until": until}).items() if value is not None
    }
    if scope is not None and entity_id is None:
        params["scope"] = sorted(scope)
    query = paging.fingerprint(
        "audit", entity_id, request_id, changed_by, action, since, until, scope and sorted(scope)
    )
    statement = _trail_statement(tuple(params), page_token is None, limit)
    params |= paging.page_params(_TRAIL_KEYS, page_token=page_token, query=query)
    entries = db.named_rows(await session.exec(statement, params=params))
    page = paging.cut(entries, _TRAIL_KEYS, limit=limit, query=query, value=operator.getitem)
    # In a trail of one entity the header names it; its id in every entry would say it again.
    with_entity = entity_id is None
    result: AuditTrail = {
        "items": [_entry_public(entry, with_entity=with_entity) for entry in page.rows],
        "has_more": page.has_more,
    }
    if entity_id is not None:
        entity = entries[0]["Entity"] if entries else await session.get(Entity, entity_id)
        if entity is None:
            raise NotFoundError(f"no task or project has id {entity_id}")
        result = {"entity": _entity_ref(entity), **result}
    if (token := page.next_page_token) is not None:
        result["next_page_token"] = token
    return result
