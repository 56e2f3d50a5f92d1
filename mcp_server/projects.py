"""Project data functions."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import String, bindparam
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from mcp_server import audit, locks, paging, scopes, titles
from mcp_server.errors import ConflictError, NotFoundError, is_unique_violation
from mcp_server.filters import contains, escape_like
from mcp_server.identity import Call
from mcp_server.models import AuditAction, Project, utcnow
from mcp_server.schemas import ProjectPage, ProjectPublic, iso_time
from mcp_server.scopes import Scope
from mcp_server.sql import one_of

_KEYS = (
    paging.SortKey("title", Project.title, False, str, str),
    paging.SortKey("id", Project.id, False, int, paging.load_id),
)


def project_public(project: Project) -> ProjectPublic:
    assert project.id is not None, "a loaded or flushed project has its id"
    return {
        "id": project.id,
        "name": project.title,
        "description": project.description,
        "created_at": iso_time(project.created_at),
        "updated_at": iso_time(project.updated_at),
    }


def not_live(project_id: int) -> NotFoundError:
    return NotFoundError(
        f"project {project_id} does not exist or is deleted; list_projects shows the live ones"
    )


_BY_ID = select(Project).where(col(Project.id) == bindparam("project_id"))


async def load_live(session: AsyncSession, project_id: int, scope: Scope) -> Project:
    """The project, unless it does not exist or is deleted; one outside `scope` is refused."""
    project = (await session.exec(_BY_ID, params={"project_id": project_id})).first()
    if project is None:
        raise not_live(project_id)
    scopes.require(scope, project_id, f"project {project_id}")
    return project


async def is_live(session: AsyncSession, project_id: int) -> bool:
    """Whether the project exists and is not deleted."""
    return (await session.exec(_BY_ID, params={"project_id": project_id})).first() is not None


_READS_THE_SAME = (
    select(Project.id, Project.title)
    .where(col(Project.title_key) == bindparam("name_key"), col(Project.id) != bindparam("except_id"))
    .order_by(col(Project.id))
    .limit(1)
)
_SAME = (
    "(names are compared ignoring case, width, invisible characters, and letters of other scripts that "
    "look alike: Unicode NFKC and the confusable skeletons of UTS #39)"
)


async def require_name_free(session: AsyncSession, name: str, *, remedy: str, except_id: int = 0) -> str:
    """The key of `name` (titles.name_key) when no other live project's name reads the same; else a
    conflict that names the project that has it. New names take turns from here to their commit."""
    await locks.take(session, locks.Space.PROJECT_NAMES)
    name_key = titles.name_key(name)
    rows = await session.exec(_READS_THE_SAME, params={"name_key": name_key, "except_id": except_id})
    if (taken := rows.first()) is not None:
        taken_id, title = taken
        same = "" if title == name else f", and {name!r} reads the same {_SAME}"
        raise ConflictError(f"a live project is named {title!r} (id {taken_id}){same}; {remedy}")
    return name_key


async def create_project(session: AsyncSession, call: Call, name: str, description: str) -> ProjectPublic:
    scopes.require_all(call.permissions.projects)
    name_key = await require_name_free(session, name, remedy="use it or pick another name")
    now = utcnow()
    project = Project(title=name, title_key=name_key, description=description, created_at=now, updated_at=now)
    session.add(project)
    new = {"name": name, "description": description}
    session.add(audit.entry(call, AuditAction.CREATED, now, project, None, new))
    try:
        await session.flush()
    except IntegrityError as exc:
        if not is_unique_violation(exc):
            raise
        # Another caller created the same name between our check and our insert.
        raise ConflictError(f"a project named {name!r} already exists; use it or pick another name") from None
    return project_public(project)


@lru_cache(maxsize=64)
def _list_statement(named: bool, scoped: bool, first: bool, limit: int) -> SelectOfScalar[Project]:
    statement = select(Project)
    if scoped:
        statement = statement.where(one_of(col(Project.id), "scope"))
    if named:
        statement = statement.where(contains(Project.title, bindparam("name_contains", type_=String)))
    return paging.paged(statement, _KEYS, first=first, limit=limit)


async def list_projects(
    session: AsyncSession, *, name_contains: str | None, limit: int, page_token: str | None, scope: Scope
) -> ProjectPage:
    """A page of the live projects within `scope`, by name."""
    params: dict[str, object] = {} if not name_contains else {"name_contains": escape_like(name_contains)}
    if scope is not None:
        params["scope"] = sorted(scope)
    query = paging.fingerprint("projects", name_contains, params.get("scope"))
    found = await session.exec(
        _list_statement(bool(name_contains), scope is not None, page_token is None, limit),
        params=params | paging.page_params(_KEYS, page_token=page_token, query=query),
    )
    page = paging.cut(found.all(), _KEYS, limit=limit, query=query)
    result: ProjectPage = {"items": [project_public(p) for p in page.rows], "has_more": page.has_more}
    if (token := page.next_page_token) is not None:
        result["next_page_token"] = token
    return result
