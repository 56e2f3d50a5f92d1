"""Project data functions."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import audit, paging
from mcp_server.audit import Actor
from mcp_server.errors import ConflictError, NotFoundError
from mcp_server.models import AuditAction, Project, utcnow
from mcp_server.schemas import ProjectPage, ProjectPublic

_KEYS = [
    paging.SortKey("title", col(Project.title), False, str, str),
    paging.SortKey("id", col(Project.id), False, int, int),
]


async def load_live(session: AsyncSession, project_id: int) -> Project:
    project = await session.get(Project, project_id)
    if project is None or project.deleted_at is not None:
        raise NotFoundError(
            f"project {project_id} does not exist or is deleted; list_projects shows the live ones"
        )
    return project


async def create_project(session: AsyncSession, actor: Actor, name: str, description: str) -> ProjectPublic:
    existing = (
        await session.exec(select(Project.id).where(Project.title == name, col(Project.deleted_at).is_(None)))
    ).first()
    if existing is not None:
        raise ConflictError(
            f"a project named {name!r} already exists (id {existing}); use it or pick another name"
        )
    now = utcnow()
    project = Project(title=name, description=description, created_at=now, updated_at=now)
    session.add(project)
    try:
        await session.flush()
    except sa_exc.IntegrityError:
        # Another caller created the same name between our check and our insert.
        raise ConflictError(f"a project named {name!r} already exists; use it or pick another name") from None
    audit.record(session, actor, project, AuditAction.CREATED, at=now, old=None, new=audit.snapshot(project))
    return ProjectPublic.of(project)


async def list_projects(
    session: AsyncSession, *, name_contains: str | None, limit: int, page_token: str | None
) -> ProjectPage:
    statement = select(Project).where(col(Project.deleted_at).is_(None))
    if name_contains:
        statement = statement.where(col(Project.title).icontains(name_contains, autoescape=True))
    page = await paging.fetch_page(
        session,
        paging.paged(statement, _KEYS, first=page_token is None),
        _KEYS,
        params={},
        limit=limit,
        page_token=page_token,
        query=paging.fingerprint("projects", name_contains),
    )
    return ProjectPage(
        items=[ProjectPublic.of(p) for p in page.rows],
        has_more=page.has_more,
        next_page_token=page.next_page_token,
    )
