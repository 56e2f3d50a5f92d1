"""Adding and removing dependencies: task A waits for task B (B blocks A).

An edge that would close a cycle is refused, naming the cycle. Edges are added one at a time
under a lock of the graph (on PostgreSQL a row lock, locks.py; SQLite has one writer),
so two edges added at once cannot close a cycle neither saw: graph changes are rare, and a
cycle would block its tasks forever. Each change is an audited change of the waiting task, its
`blocked_by` list before and after.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, insert, literal
from sqlalchemy.sql.expression import cast
from sqlalchemy.types import String
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import audit, graph, locks, tasks
from mcp_server.errors import ConflictError, InvalidInputError
from mcp_server.identity import Call
from mcp_server.models import AuditAction, Task, TaskDependency, utcnow
from mcp_server.schemas import TaskPublic

MAX_DEPTH = 1000
_EDGE = TaskDependency.__table__  # type: ignore[attr-defined]  # SQLModel does not declare it


async def add_dependency(session: AsyncSession, call: Call, task_id: int, blocked_by: int) -> TaskPublic:
    """Make `task_id` wait for `blocked_by`; a repeat changes nothing."""
    if task_id == blocked_by:
        raise InvalidInputError("blocked_by: a task cannot wait for itself; give another task's id")
    await locks.take(session, locks.Space.GRAPH)
    task = tasks.live(await tasks.find(session, task_id, scope=call.permissions.projects, to_change=True))
    tasks.live(await tasks.find(session, blocked_by, scope=call.permissions.projects))
    before = await _blocked_by(session, task_id)
    if blocked_by in before:
        return await _shown(session, task)
    if (cycle := await _path(session, blocked_by, task_id)) is not None:
        chain = " → ".join(str(node) for node in [task_id, *cycle])
        raise ConflictError(
            f"task {task_id} cannot wait for task {blocked_by}: {blocked_by} already waits for {task_id} "
            f"through {chain}, and the cycle would block them all forever; nothing was changed"
        )
    now = utcnow()
    await session.exec(insert(_EDGE).values(task_id=task_id, blocked_by=blocked_by, created_at=now))
    return await _record(session, call, task, before, sorted([*before, blocked_by]), now)


async def remove_dependency(session: AsyncSession, call: Call, task_id: int, blocked_by: int) -> TaskPublic:
    """Stop `task_id` waiting for `blocked_by`; removing an edge that is not there changes nothing."""
    task = tasks.live(await tasks.find(session, task_id, scope=call.permissions.projects, to_change=True))
    await tasks.find(session, blocked_by, scope=call.permissions.projects)  # both ends within the scope
    before = await _blocked_by(session, task_id)
    if blocked_by not in before:
        return await _shown(session, task)
    now = utcnow()
    await session.exec(delete(_EDGE).where(_EDGE.c.task_id == task_id, _EDGE.c.blocked_by == blocked_by))
    return await _record(session, call, task, before, [b for b in before if b != blocked_by], now)


async def _record(
    session: AsyncSession, call: Call, task: Task, before: list[int], after: list[int], now: datetime
) -> TaskPublic:
    task.updated_at = now
    session.add(
        audit.entry(call, AuditAction.UPDATED, now, task, {"blocked_by": before}, {"blocked_by": after})
    )
    await tasks.flush(session, task)
    return await _shown(session, task)


async def _shown(session: AsyncSession, task: Task) -> TaskPublic:
    shown = tasks.public(task)
    assert task.id is not None
    shown["blocked_by"] = await graph.blockers(session, task.id, unfinished_only=False)
    return shown


async def _blocked_by(session: AsyncSession, task_id: int) -> list[int]:
    found = await session.exec(
        select(_EDGE.c.blocked_by).where(_EDGE.c.task_id == task_id).order_by(_EDGE.c.blocked_by)
    )
    return list(found.all())


async def _path(session: AsyncSession, start: int, goal: int) -> list[int] | None:
    """A path of waiting from `start` to `goal` (each task waits for the next), if there is one."""
    walk = (
        select(
            _EDGE.c.blocked_by.label("node"),
            (literal(f"{start},", String) + cast(_EDGE.c.blocked_by, String)).label("path"),
            literal(1).label("depth"),
        )
        .where(_EDGE.c.task_id == start)
        .cte("walk", recursive=True)
    )
    step = (
        select(
            _EDGE.c.blocked_by,
            walk.c.path + literal(",", String) + cast(_EDGE.c.blocked_by, String),
            walk.c.depth + 1,
        )
        .join(walk, _EDGE.c.task_id == walk.c.node)
        .where(walk.c.node != goal, walk.c.depth < MAX_DEPTH)
    )
    walk = walk.union(step)
    found = await session.exec(select(walk.c.path).where(walk.c.node == goal).order_by(walk.c.depth).limit(1))
    path = found.first()
    return None if path is None else [int(node) for node in str(path).split(",")]
