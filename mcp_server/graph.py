"""The dependency graph in SQL: which tasks are blocked, by which, and which a finished task freed.

A task is blocked while any task it waits for (a `task_dependency` edge) is live and unfinished:
a completed, cancelled or deleted blocker holds nothing back. These are the predicates and reads
every other module uses (tasks.py for transitions, claims.py for the queue, filters.py for
`ready`); dependencies.py adds and removes edges.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, exists, not_, select
from sqlalchemy.orm import aliased
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server.models import ENTITY_TABLE, LIVE_HOLDER, Task, TaskDependency, TaskStatus
from mcp_server.schemas import BlockerRef

FINISHED = (TaskStatus.COMPLETED.value, TaskStatus.CANCELLED.value)
# Statuses a task may not move to while something blocks it.
NEEDS_UNBLOCKED = (TaskStatus.IN_PROGRESS.value, TaskStatus.COMPLETED.value)
CLAIMABLE = (TaskStatus.PENDING.value, TaskStatus.IN_PROGRESS.value)

_blocker = aliased(Task, name="blocker")
_EDGE = TaskDependency.__table__  # type: ignore[attr-defined]


def _holds_back(edge: Any) -> Any:
    """The edge's blocker is live and unfinished."""
    return exists().where(
        col(_blocker.id) == edge.c.blocked_by,
        col(_blocker.deleted_at).is_(None),
        col(_blocker.status).not_in(FINISHED),
    )


def waits(task_id: Any) -> Any:
    """The task `task_id` (a column) waits for something unfinished. Its edges are an alias of
    their own, so the test never correlates with edges the enclosing statement reads."""
    edge = _EDGE.alias("waits_for")
    return exists().where(edge.c.task_id == task_id, _holds_back(edge))


# The task of the entity row in the statement (`entity`, or Task) waits for something unfinished.
BLOCKED: Any = waits(ENTITY_TABLE.c.id)
# Free to start: pending or in progress, nobody holds a live claim, nothing unfinished blocks it.
# A statement that uses it binds models.CLAIMS_NOW.
READY: Any = and_(ENTITY_TABLE.c.status.in_(CLAIMABLE), LIVE_HOLDER.is_(None), not_(BLOCKED))


async def blockers(session: AsyncSession, task_id: int, *, unfinished_only: bool) -> list[BlockerRef]:
    """The tasks `task_id` waits for, by id: id, title and status (deleted ones left out)."""
    query = (
        select(col(_blocker.id), col(_blocker.title), col(_blocker.status))
        .join(_EDGE, _EDGE.c.blocked_by == _blocker.id)
        .where(_EDGE.c.task_id == task_id, col(_blocker.deleted_at).is_(None))
        .order_by(col(_blocker.id))
    )
    if unfinished_only:
        query = query.where(col(_blocker.status).not_in(FINISHED))
    rows = (await session.exec(query)).all()  # type: ignore[call-overload]
    return [{"id": row.id, "title": row.title, "status": row.status} for row in rows]


async def unblocked_by(session: AsyncSession, task_id: int) -> list[int]:
    """The live tasks that waited for `task_id` and, now that it is finished, wait for nothing."""
    waiting = aliased(Task, name="waiting")
    query = (
        select(col(waiting.id))
        .join(_EDGE, _EDGE.c.task_id == waiting.id)
        .where(
            _EDGE.c.blocked_by == task_id,
            col(waiting.deleted_at).is_(None),
            col(waiting.status).not_in(FINISHED),
            ~waits(waiting.id),
        )
        .order_by(col(waiting.id))
    )
    return list((await session.exec(query)).scalars())  # type: ignore[call-overload]
