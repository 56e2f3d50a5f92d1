"""The audit log: entries written by the statement that makes the change, and the trail query."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from functools import lru_cache
from typing import Any

from pydantic_core import from_json
from sqlalchemy import (
    ColumnElement,
    FromClause,
    Insert,
    Select,
    String,
    Text,
    bindparam,
    cast,
    insert,
    literal,
    true,
)
from sqlalchemy import select as sql_select

from mcp_server import chain, paging
from mcp_server.db import Conn, iso_text, json_object
from mcp_server.errors import NotFoundError
from mcp_server.models import (
    AUDIT_TABLE,
    ENTITY_TABLE,
    AuditAction,
    EntityKind,
    JSONValue,
    UTCDateTime,
    utcnow,
)
from mcp_server.schemas import AuditEntryPublic, AuditTrail, EntityRef, iso_time

MAX_RECORDED_ARGUMENTS = 20_000

_audit = AUDIT_TABLE
_entity = ENTITY_TABLE


@dataclass(frozen=True)
class Actor:
    """Who is changing data, in which tool call. The server decides it; no tool argument can.

    `client_name` is what the client called itself when it connected: context, not identity.
    """

    agent_id: str
    request_id: str
    client_name: str | None = None


def json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_time(value)
    return value.value if isinstance(value, Enum) else value


def diff(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The before and after of just the keys whose values differ."""
    changed = [key for key in new if old.get(key) != new[key]]
    return {key: old.get(key) for key in changed}, {key: new[key] for key in changed}


# The entry of a change, inserted by the changing statement itself (see db.Conn.change_one): the
# changed row gives the entity's id, the parameters from `entry` give the rest. An entry is
# written with exactly the content its hash covers (after its position, which the seal assigns).
_ENTRY_COLUMNS = chain.CONTENT[1:]


def entry_of(changed: FromClause) -> Insert:
    """The audit entry of the row `changed`, its other values bound by `entry`."""
    return insert(_audit).from_select(
        list(_ENTRY_COLUMNS),
        sql_select(
            changed.c.id,
            changed.c.kind,
            bindparam("audit_action", type_=String),
            bindparam("audit_changed_by", type_=String),
            bindparam("audit_client_name", type_=String),
            bindparam("at", type_=UTCDateTime()),
            bindparam("audit_request_id", type_=String),
            bindparam("audit_old", type_=JSONValue),
            bindparam("audit_new", type_=JSONValue),
        ),
    )


def entry(
    actor: Actor, action: AuditAction, at: datetime, old: dict[str, Any] | None, new: dict[str, Any] | None
) -> dict[str, Any]:
    """The parameters of `entry_of`: what happened, when (`at`, shared with the change), and by whom."""
    return {
        "audit_action": action.value,
        "audit_changed_by": actor.agent_id,
        "audit_client_name": actor.client_name,
        "at": at,
        "audit_request_id": actor.request_id,
        "audit_old": None if old is None else {k: json_value(v) for k, v in old.items()},
        "audit_new": None if new is None else {k: json_value(v) for k, v in new.items()},
    }


_REFUSAL = insert(_audit).values(
    action=AuditAction.REFUSED.value,
    changed_by=bindparam("audit_changed_by", type_=String),
    client_name=bindparam("audit_client_name", type_=String),
    changed_at=bindparam("at", type_=UTCDateTime()),
    request_id=bindparam("audit_request_id", type_=String),
    new_value=bindparam("audit_new", type_=JSONValue),
)


async def record_refusal(conn: Conn, actor: Actor, tool: str, permission: str, arguments: Any) -> None:
    """A call refused for want of a permission: who tried which tool with what, and what was missing."""
    if len(json.dumps(arguments, default=str)) > MAX_RECORDED_ARGUMENTS:
        arguments = {"omitted": f"the arguments were longer than {MAX_RECORDED_ARGUMENTS} characters"}
    refused = {"tool": tool, "missing_permission": permission, "arguments": arguments}
    await conn.execute(_REFUSAL, entry(actor, AuditAction.REFUSED, utcnow(), None, refused))


def status_changes(matching: ColumnElement[bool]) -> Insert:
    """One entry per task matching `matching`, with its old status and the new one (bound as
    target_status), in a single INSERT ... SELECT; the actor and time are bound as by `entry`.

    On PostgreSQL the SELECT locks the rows it reads (FOR UPDATE), so the old status recorded is
    the one the following UPDATE overwrites, even with concurrent writers.
    """
    source = (
        sql_select(
            _entity.c.id,
            literal(EntityKind.TASK.value),
            literal(AuditAction.UPDATED.value),
            bindparam("audit_changed_by", type_=String),
            bindparam("audit_client_name", type_=String),
            bindparam("at", type_=UTCDateTime()),
            bindparam("audit_request_id", type_=String),
            json_object(literal("status"), _entity.c.status),
            json_object(literal("status"), bindparam("target_status", type_=String)),
        )
        .where(matching)
        .with_for_update()
    )
    return insert(_audit).from_select(list(_ENTRY_COLUMNS), source)


# The trail reads plain columns and builds its entries from them (see tasks.task_of).
_TRAIL_FIELDS = tuple(AuditEntryPublic.__annotations__)
_JSON_FIELDS = ("old_value", "new_value")


def _trail_column(name: str) -> Any:
    column = _audit.c[name]
    if name == "changed_at":
        return iso_text(column).label(name)
    if name in _JSON_FIELDS:
        return cast(column, Text).label(name)  # JSON text, parsed a page at a time (get_audit_trail)
    return column


_TRAIL_ROW = [_trail_column(name) for name in _TRAIL_FIELDS]
_TRAIL_KEYS = (
    paging.SortKey("changed_at", _audit.c.changed_at, True, str, paging.load_time),
    paging.SortKey("id", _audit.c.id, True, int, paging.load_id),
)
_TRAIL_KEY_POSITIONS = tuple(_TRAIL_FIELDS.index(key.name) for key in _TRAIL_KEYS)
_ENTITY_REF = (_entity.c.id, _entity.c.kind, _entity.c.title, _entity.c.deleted_at)

# Each narrowing the trail can take: its column, and how the column compares with the value.
_NARROWING: dict[str, tuple[Any, Callable[[Any, Any], ColumnElement[bool]]]] = {
    "entity_id": (_audit.c.entity_id, operator.eq),
    "request_id": (_audit.c.request_id, operator.eq),
    "changed_by": (_audit.c.changed_by, operator.eq),
    "action": (_audit.c.action, operator.eq),
    "since": (_audit.c.changed_at, operator.ge),
    "until": (_audit.c.changed_at, operator.lt),
}


def _entry_of(row: Any, at: int, old: Any, new: Any, *, with_entity: bool) -> AuditEntryPublic:
    """The columns of _TRAIL_ROW in `row`, from position `at`, as an entry of the trail, with its
    values `old` and `new` parsed; its entity's id only `with_entity`."""
    id, entity_id, action, changed_by, client_name, changed_at, request_id = row[at : at + 7]
    entry: AuditEntryPublic = {
        "id": id,
        "action": action,
        "changed_by": changed_by,
        "changed_at": changed_at,
        "request_id": request_id,
    }
    if with_entity and entity_id is not None:
        entry["entity_id"] = entity_id
    if client_name is not None:
        entry["client_name"] = client_name
    if old is not None:
        entry["old_value"] = old
    if new is not None:
        entry["new_value"] = new
    return entry


@lru_cache(maxsize=256)
def _trail_statement(narrowed_by: tuple[str, ...], first: bool, limit: int) -> Select[Any]:
    """The trail's page for a set of narrowings, built once and kept (see paging.paged). Narrowed
    to one entity, the entity comes along in the same statement: every row starts with its id,
    kind, name and deleted_at, and an entity without entries is one row of those alone."""
    conditions = [
        compare(column, bindparam(name, type_=column.type))
        for name in narrowed_by
        for column, compare in [_NARROWING[name]]
    ]
    if "entity_id" not in narrowed_by:
        return paging.paged(sql_select(*_TRAIL_ROW).where(*conditions), _TRAIL_KEYS, first=first, limit=limit)
    # The entries keep their time as stored too, to be put back in order by it: sorting the
    # page by its time as text would compare strings, at several times the cost.
    sort_at = _audit.c.changed_at.label("sort_at")
    page = paging.paged(
        sql_select(*_TRAIL_ROW, sort_at).where(*conditions), _TRAIL_KEYS, first=first, limit=limit
    )
    entries = page.subquery("entries")
    return (
        sql_select(*_ENTITY_REF, *(entries.c[name] for name in _TRAIL_FIELDS))
        .select_from(_entity.outerjoin(entries, true()))
        .where(_entity.c.id == bindparam("entity_id"))
        .order_by(entries.c.sort_at.desc(), entries.c.id.desc())
    )


async def get_audit_trail(
    conn: Conn,
    *,
    entity_id: int | None,
    request_id: str | None,
    changed_by: str | None,
    action: AuditAction | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    page_token: str | None,
) -> AuditTrail:
    given = {"entity_id": entity_id, "request_id": request_id, "changed_by": changed_by, "action": action}
    params = {
        name: value for name, value in (given | {"since": since, "until": until}).items() if value is not None
    }
    query = paging.fingerprint("audit", entity_id, request_id, changed_by, action, since, until)
    statement = _trail_statement(tuple(params), page_token is None, limit)
    params |= paging.page_params(_TRAIL_KEYS, page_token=page_token, query=query)
    rows = await conn.rows(statement, params)
    result: AuditTrail = {"items": [], "has_more": False}
    at = 0  # where the entry's columns start in a row
    if entity_id is not None:
        if not rows:
            raise NotFoundError(f"no task or project has id {entity_id}")
        id, kind, name, deleted_at = rows[0][: len(_ENTITY_REF)]
        entity: EntityRef = {"id": id, "type": kind, "name": name, "deleted": deleted_at is not None}
        result = {"entity": entity, "items": [], "has_more": False}
        at = len(_ENTITY_REF)
        if rows[0][at] is None:  # the entity's one row, without entries
            rows = []
    positions = [at + position for position in _TRAIL_KEY_POSITIONS]
    page = paging.cut(rows, positions, _TRAIL_KEYS, limit=limit, query=query)
    # One parse for the values of the whole page, rather than one per value.
    texts = [text for row in page.rows for text in row[at + 7 : at + 9]]
    values = iter(from_json("[" + ",".join("null" if text is None else text for text in texts) + "]"))
    # In a trail of one entity the header names it; its id in every entry would say it again.
    with_entity = entity_id is None
    result["items"] = [
        _entry_of(row, at, next(values), next(values), with_entity=with_entity) for row in page.rows
    ]
    result["has_more"] = page.has_more
    if (token := page.next_page_token) is not None:
        result["next_page_token"] = token
    return result
