"""The audit log: entries written inside the caller's transaction, and the trail query."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Select, String, bindparam, insert, literal
from sqlalchemy import select as sql_select
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import paging
from mcp_server.db import json_object
from mcp_server.errors import NotFoundError
from mcp_server.models import (
    AUDIT_TABLE,
    ENTITY_TABLE,
    AuditAction,
    AuditEntry,
    Entity,
    EntityKind,
    Task,
    TaskStatus,
    UTCDateTime,
    utcnow,
)
from mcp_server.schemas import AuditEntryPublic, AuditTrail, EntityRef

MAX_RECORDED_ARGUMENTS = 20_000


@dataclass(frozen=True)
class Actor:
    """Who is changing data, in which tool call. The server decides it; no tool argument can.

    `client_name` is what the client called itself when it connected: context, not identity.
    """

    agent_id: str
    request_id: str
    client_name: str | None = None


def snapshot(entity: Entity) -> dict[str, Any]:
    """The JSON form of an entity's audited fields, named as the tools name them."""
    if entity.kind == EntityKind.PROJECT:
        return {"name": entity.title, "description": entity.description}
    return {
        "title": entity.title,
        "description": entity.description,
        "status": json_value(entity.status),
        "priority": json_value(entity.priority),
        "project_id": entity.project_id,
    }


def json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value.value if isinstance(value, Enum) else value


def diff(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The before and after of just the keys whose values differ."""
    changed = [key for key in new if old.get(key) != new[key]]
    return {key: old.get(key) for key in changed}, {key: new[key] for key in changed}


def record(
    session: AsyncSession,
    actor: Actor,
    entity: Entity,
    action: AuditAction,
    *,
    at: datetime,
    old: dict[str, Any] | None,
    new: dict[str, Any] | None,
) -> None:
    assert entity.id is not None
    session.add(
        AuditEntry(
            entity_id=entity.id,
            entity_type=entity.kind,
            action=action,
            changed_by=actor.agent_id,
            client_name=actor.client_name,
            changed_at=at,
            request_id=actor.request_id,
            old_value={k: json_value(v) for k, v in old.items()} if old is not None else None,
            new_value={k: json_value(v) for k, v in new.items()} if new is not None else None,
        )
    )


def record_refusal(session: AsyncSession, actor: Actor, tool: str, permission: str, arguments: Any) -> None:
    """A call refused for want of a permission: who tried which tool with what, and what was missing."""
    if len(json.dumps(arguments, default=str)) > MAX_RECORDED_ARGUMENTS:
        arguments = {"omitted": f"the arguments were longer than {MAX_RECORDED_ARGUMENTS} characters"}
    session.add(
        AuditEntry(
            action=AuditAction.REFUSED,
            changed_by=actor.agent_id,
            client_name=actor.client_name,
            changed_at=utcnow(),
            request_id=actor.request_id,
            new_value={"tool": tool, "missing_permission": permission, "arguments": arguments},
        )
    )


async def record_status_changes(
    session: AsyncSession, actor: Actor, matching: ColumnElement[bool], status: TaskStatus, *, at: datetime
) -> int:
    """One entry per task matching `matching`, old and new status, in a single INSERT ... SELECT.

    On PostgreSQL the SELECT locks the rows it reads (FOR UPDATE), so the old status recorded is
    the one the following UPDATE overwrites, even with concurrent writers.
    Returns how many entries (so how many tasks) it wrote.
    """
    columns = ["entity_id", "entity_type", "action", "changed_by", "client_name", "changed_at", "request_id"]
    source = (
        sql_select(
            col(Task.id),
            literal(EntityKind.TASK.value),
            literal(AuditAction.UPDATED.value),
            literal(actor.agent_id),
            literal(actor.client_name, String),
            literal(at, UTCDateTime),
            literal(actor.request_id),
            json_object(literal("status"), col(Task.status)),
            json_object(literal("status"), literal(status.value)),
        )
        .where(matching)
        .with_for_update()
    )
    result = await session.exec(insert(AuditEntry).from_select([*columns, "old_value", "new_value"], source))
    return result.rowcount


_audit = AUDIT_TABLE
_entity = ENTITY_TABLE
# Plain columns, not mapped objects: a page of rows, validated as one page (see tasks._task_fields).
_TRAIL_FIELDS = tuple(AuditEntryPublic.model_fields)
_TRAIL_ROW = [_audit.c[name] for name in _TRAIL_FIELDS]
_TRAIL_KEYS = [
    paging.SortKey("changed_at", _audit.c.changed_at, True, datetime.isoformat, paging.load_time),
    paging.SortKey("id", _audit.c.id, True, int, int),
]


# Each narrowing the trail can take: its column, and how the column compares with the value.
_NARROWING: dict[str, tuple[Any, Callable[[Any, Any], ColumnElement[bool]]]] = {
    "entity_id": (_audit.c.entity_id, operator.eq),
    "request_id": (_audit.c.request_id, operator.eq),
    "changed_by": (_audit.c.changed_by, operator.eq),
    "action": (_audit.c.action, operator.eq),
    "since": (_audit.c.changed_at, operator.ge),
    "until": (_audit.c.changed_at, operator.lt),
}
_ENTITY_REF = select(_entity.c.id, _entity.c.kind, _entity.c.title, _entity.c.deleted_at).where(
    _entity.c.id == bindparam("entity_id")
)


@lru_cache(maxsize=128)
def _trail_statement(narrowed_by: tuple[str, ...], first: bool) -> Select[Any]:
    """The trail's statement for a set of narrowings, built once and kept (see paging.paged)."""
    conditions = [
        compare(column, bindparam(name, type_=column.type))
        for name in narrowed_by
        for column, compare in [_NARROWING[name]]
    ]
    return paging.paged(sql_select(*_TRAIL_ROW).where(*conditions), _TRAIL_KEYS, first=first)


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
) -> AuditTrail:
    given = {"entity_id": entity_id, "request_id": request_id, "changed_by": changed_by, "action": action}
    params = {
        name: value for name, value in (given | {"since": since, "until": until}).items() if value is not None
    }
    entity = None
    if entity_id is not None:
        entity = (await session.exec(_ENTITY_REF, params={"entity_id": entity_id})).one_or_none()
        if entity is None:
            raise NotFoundError(f"no task or project has id {entity_id}")
    page = await paging.fetch_page(
        session,
        _trail_statement(tuple(params), page_token is None),
        _TRAIL_KEYS,
        params=params,
        limit=limit,
        page_token=page_token,
        query=paging.fingerprint("audit", entity_id, request_id, changed_by, action, since, until),
    )
    return AuditTrail.model_validate(
        {
            "entity": None if entity is None else EntityRef.of(entity),
            "items": [dict(zip(_TRAIL_FIELDS, row, strict=True)) for row in page.rows],
            "has_more": page.has_more,
            "next_page_token": page.next_page_token,
        }
    )
