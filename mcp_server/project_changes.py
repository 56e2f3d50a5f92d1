"""Deleting, restoring and renaming projects, with what happens to their tasks.

A project is deleted softly, like a task. One with live tasks is deleted only when the caller says
what happens to them: deleted with it, or moved to another project, each set-based with an entry
per task (tasks.delete_project_tasks, tasks.move_project_tasks); a live task another agent holds
refuses the deletion. Restoring the project brings back the tasks its deletion deleted (known by
the deletion's request id in the audit log), and no others. The project's row is locked from the
start, and a create in it waits for that lock (tasks.create_task), so no task is created in a
project while it is being deleted.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import bindparam, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import audit, projects, scopes, tasks
from mcp_server.db import INCLUDE_DELETED
from mcp_server.errors import ConflictError, InvalidInputError, NotFoundError, is_unique_violation
from mcp_server.identity import Call
from mcp_server.models import AuditAction, AuditEntry, Project, Task, utcnow
from mcp_server.schemas import ProjectChanged

LiveTasks = Literal["delete", "move"]

_TO_CHANGE = select(Project).where(col(Project.id) == bindparam("project_id")).with_for_update(of=Project)
_LIVE_TASKS = select(func.count()).select_from(Task).where(col(Task.project_id) == bindparam("project_id"))
_DELETED_BY = (
    select(AuditEntry.request_id)
    .where(
        col(AuditEntry.entity_id) == bindparam("project_id"),
        col(AuditEntry.action) == AuditAction.DELETED.value,
    )
    .order_by(col(AuditEntry.id).desc())
    .limit(1)
)


async def _load(session: AsyncSession, call: Call, project_id: int) -> Project:
    """The project, deleted or not, locked until the call ends; one outside the caller's scope is refused."""
    found = await session.exec(
        _TO_CHANGE, params={"project_id": project_id}, execution_options=INCLUDE_DELETED
    )
    project = found.first()
    if project is None:
        raise NotFoundError(f"project {project_id} does not exist; list_projects shows the live ones")
    scopes.require(call.permissions.projects, project_id, f"project {project_id}")
    return project


def _result(project: Project, call: Call, changed: int, tasks_were: str | None = None) -> ProjectChanged:
    result: ProjectChanged = {
        "project": projects.project_public(project),
        "deleted": project.deleted_at is not None,
        "changed_count": changed,
        "request_id": call.request_id,
    }
    if tasks_were is not None:
        result["tasks"] = tasks_were  # type: ignore[typeddict-item]  # one of the Literal's values
    return result


async def delete_project(
    session: AsyncSession, call: Call, project_id: int, *, live_tasks: LiveTasks | None, move_to: int | None
) -> ProjectChanged:
    if (live_tasks == "move") != (move_to is not None):
        raise InvalidInputError(
            "move_to: give it with live_tasks='move' (the project the tasks move to), and only then"
        )
    if move_to == project_id:
        raise InvalidInputError(
            "move_to: the tasks cannot move to the project being deleted; give another one"
        )
    project = await _load(session, call, project_id)
    if project.deleted_at is not None:
        return _result(project, call, 0)  # deleted already: a repeat, which changes nothing
    count = (await session.exec(_LIVE_TASKS, params={"project_id": project_id})).one()
    if count and live_tasks is None:
        raise ConflictError(
            f"project {project_id} has {count} live task(s); say what happens to them: live_tasks='delete' "
            "deletes them with it (restore_project brings them back), or live_tasks='move' with move_to "
            "moves them to another project; nothing was changed"
        )
    if held := await tasks.held_by_others(session, call, project_id):
        listed = ", ".join(f"task {task_id} by {holder}" for task_id, holder in held)
        raise ConflictError(
            f"project {project_id} has tasks other agents hold claims on ({listed}); they must finish or "
            "release them first, or their leases end; nothing was changed"
        )
    changed, tasks_were = 0, None
    now = utcnow()  # the project's deletion time, and its tasks'
    if count and live_tasks == "move":
        assert move_to is not None
        await projects.load_live(session, move_to, call.permissions.projects)
        changed, tasks_were = await tasks.move_project_tasks(session, call, project_id, move_to), "moved"
    elif count:
        changed, tasks_were = await tasks.delete_project_tasks(session, call, project_id, now), "deleted"
    new = (
        {"deleted_at": now}
        | ({"tasks": tasks_were} if tasks_were else {})
        | ({"move_to": move_to} if move_to else {})
    )
    project.deleted_at, project.updated_at = now, now
    session.add(audit.entry(call, AuditAction.DELETED, now, project, {"deleted_at": None}, new))
    await session.flush()
    return _result(project, call, changed, tasks_were)


async def restore_project(session: AsyncSession, call: Call, project_id: int) -> ProjectChanged:
    project = await _load(session, call, project_id)
    if project.deleted_at is None:
        return _result(project, call, 0)  # live already: a repeat, which changes nothing
    await projects.require_name_free(
        session,
        project.title,
        remedy="rename_project one of them first; nothing was changed",
        except_id=project_id,
    )
    deleted_by = (await session.exec(_DELETED_BY, params={"project_id": project_id})).first()
    deleted_at = project.deleted_at
    changed = (
        0
        if deleted_by is None
        else await tasks.restore_project_tasks(session, call, project_id, deleted_by, deleted_at)
    )
    now = utcnow()
    project.deleted_at, project.updated_at = None, now
    session.add(
        audit.entry(
            call, AuditAction.RESTORED, now, project, {"deleted_at": deleted_at}, {"deleted_at": None}
        )
    )
    await _flush(session, project.title)
    return _result(project, call, changed, "restored" if changed else None)


async def rename_project(session: AsyncSession, call: Call, project_id: int, name: str) -> ProjectChanged:
    project = await _load(session, call, project_id)
    if project.deleted_at is not None:
        raise projects.not_live(project_id)
    if project.title == name:
        return _result(project, call, 0)
    name_key = await projects.require_name_free(
        session, name, remedy="pick another name; nothing was changed", except_id=project_id
    )
    now = utcnow()
    session.add(audit.entry(call, AuditAction.UPDATED, now, project, {"name": project.title}, {"name": name}))
    project.title, project.title_key, project.updated_at = name, name_key, now
    await _flush(session, name)
    return _result(project, call, 0)


async def _flush(session: AsyncSession, name: str) -> None:
    try:
        await session.flush()
    except IntegrityError as exc:
        if not is_unique_violation(exc):
            raise
        # Another caller took the name between our check and our write.
        raise ConflictError(f"a live project is named {name!r} now; pick another name") from None
