"""The dependency graph in SQL: which tasks are blocked, by which, and which a finished task freed.

A task is blocked while any task it waits for (a `task_dependency` edge) is live and unfinished:
a completed, cancelled or deleted blocker holds nothing back. These are the predicates and reads
every other module uses (tasks.py for transitions, claims.py for the queue, filters.py for
`ready`); dependencies.py adds and removes edges.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, bindparam, exists, not_, select
from sqlalchemy.orm import aliased
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server.models import ENTITY_TABLE, LIVE_HOLDER, Task, TaskDependency, TaskStatus
from mcp_server.schemas import BlockerRef
from mcp_server.sql import one_of

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


# The other end of a task's edges, read first: most tasks have none, and then nothing else is
# read; and whatever the statistics say (a young database may not have been analyzed yet), the
# task rows that follow are found by primary key, never by a scan of the tasks.
_BLOCKED_BY = select(_EDGE.c.blocked_by).where(_EDGE.c.task_id == bindparam("task_id"))
_WAITING = select(_EDGE.c.task_id).where(_EDGE.c.blocked_by == bindparam("task_id"))


async def blockers(session: AsyncSession, task_id: int, *, unfinished_only: bool) -> list[BlockerRef]:
    """The tasks `task_id` waits for, by id: id, title and status (deleted ones left out)."""
    ids = list((await session.exec(_BLOCKED_BY, params={"task_id": task_id})).scalars())  # type: ignore[call-overload]
    if not ids:
        return []
    query = (
        select(col(_blocker.id), col(_blocker.title), col(_blocker.status))
        .where(one_of(col(_blocker.id), "ids"), col(_blocker.deleted_at).is_(None))
        .order_by(col(_blocker.id))
    )
    if unfinished_only:
        query = query.where(col(_blocker.status).not_in(FINISHED))
    rows = (await session.exec(query, params={"ids": ids})).all()  # type: ignore[call-overload]
    return [{"id": row.id, "title": row.title, "status": row.status} for row in rows]


_waiting = aliased(Task, name="waiting")
_UNBLOCKED = (
    select(col(_waiting.id))
    .where(
        one_of(col(_waiting.id), "ids"),
        col(_waiting.deleted_at).is_(None),
        col(_waiting.status).not_in(FINISHED),
        ~waits(_waiting.id),
    )
    .order_by(col(_waiting.id))
)


async def unblocked_by(session: AsyncSession, task_id: int) -> list[int]:
    """The live tasks that waited for `task_id` and, now that it is finished, wait for nothing."""
    ids = list((await session.exec(_WAITING, params={"task_id": task_id})).scalars())  # type: ignore[call-overload]
    if not ids:
        return []
    return list((await session.exec(_UNBLOCKED, params={"ids": ids})).scalars())  # type: ignore[call-overload]
