"""Project data functions."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import Select, String, bindparam, insert
from sqlalchemy import select as sql_select

from mcp_server import audit, paging
from mcp_server.audit import Actor
from mcp_server.db import Conn, iso_text
from mcp_server.errors import DATABASE_ERRORS, ConflictError, NotFoundError, is_unique_violation
from mcp_server.filters import escape_like
from mcp_server.models import ENTITY_TABLE, AuditAction, EntityKind, UTCDateTime, utcnow
from mcp_server.schemas import ProjectPage, ProjectPublic

_entity = ENTITY_TABLE
_IS_LIVE_PROJECT = (_entity.c.kind == EntityKind.PROJECT.value) & _entity.c.deleted_at.is_(None)
_KEYS = (
    paging.SortKey("title", _entity.c.title, False, str, str),
    paging.SortKey("id", _entity.c.id, False, int, paging.load_id),
)


def _project_row(source: Any) -> Select[Any]:
    """A project as the tools show it: the columns `project_of` unpacks."""
    return sql_select(
        *(source.c[name] for name in ("id", "title", "description")),
        *(iso_text(source.c[name]).label(name) for name in ("created_at", "updated_at")),
    )


def project_of(row: Any) -> ProjectPublic:
    id, name, description, created, updated = row
    return {
        "id": id,
        "name": name,
        "description": description,
        "created_at": created,
        "updated_at": updated,
    }


def not_live(project_id: int) -> NotFoundError:
    return NotFoundError(
        f"project {project_id} does not exist or is deleted; list_projects shows the live ones"
    )


_LIVE = sql_select(_entity.c.id).where(_entity.c.id == bindparam("project_id"), _IS_LIVE_PROJECT)


async def load_live(conn: Conn, project_id: int) -> None:
    """Raise unless the project exists and is not deleted."""
    if await conn.row(_LIVE, {"project_id": project_id}) is None:
        raise not_live(project_id)


_NAMED = sql_select(_entity.c.id).where(_entity.c.title == bindparam("name", type_=String), _IS_LIVE_PROJECT)
_CREATE = insert(_entity).values(
    kind=EntityKind.PROJECT.value,
    title=bindparam("name", type_=String),
    description=bindparam("new_description", type_=String),
    created_at=bindparam("at", type_=UTCDateTime()),
    updated_at=bindparam("at", type_=UTCDateTime()),
    version=1,
)


async def create_project(conn: Conn, actor: Actor, name: str, description: str) -> ProjectPublic:
    existing = await conn.row(_NAMED, {"name": name})
    if existing is not None:
        raise ConflictError(
            f"a project named {name!r} already exists (id {existing[0]}); use it or pick another name"
        )
    now = utcnow()
    new = {"name": name, "description": description}
    try:
        row = await conn.change_one(
            _CREATE,
            audit.entry_of,
            _project_row,
            {"name": name, "new_description": description}
            | audit.entry(actor, AuditAction.CREATED, now, None, new),
        )
    except DATABASE_ERRORS as exc:
        if not is_unique_violation(exc):
            raise
        # Another caller created the same name between our check and our insert.
        raise ConflictError(f"a project named {name!r} already exists; use it or pick another name") from None
    assert row is not None, "an INSERT ... VALUES inserts its row"
    return project_of(row)


@lru_cache(maxsize=64)
def _list_statement(named: bool, first: bool, limit: int) -> Select[Any]:
    statement = _project_row(_entity).where(_IS_LIVE_PROJECT)
    if named:
        statement = statement.where(
            _entity.c.title.icontains(bindparam("name_contains", type_=String), escape="/")
        )
    return paging.paged(statement, _KEYS, first=first, limit=limit)


async def list_projects(
    conn: Conn, *, name_contains: str | None, limit: int, page_token: str | None
) -> ProjectPage:
    params = {} if not name_contains else {"name_contains": escape_like(name_contains)}
    page = await paging.fetch_page(
        conn,
        _list_statement(bool(name_contains), page_token is None, limit),
        _KEYS,
        params=params,
        limit=limit,
        page_token=page_token,
        query=paging.fingerprint("projects", name_contains),
    )
    result: ProjectPage = {"items": [project_of(row) for row in page.rows], "has_more": page.has_more}
    if (token := page.next_page_token) is not None:
        result["next_page_token"] = token
    return result
