"""Handoff comments on tasks: what one agent tells the next, attributed to the verified agent.

Append-only: a comment is never changed or removed (the database refuses it, as it refuses
changes to the audit log), and each is recorded in the audit log with the task it is on. A
reader asks for what was said after the last comment it saw (`after`, a comment's id), so "what
was said since I last looked" is one indexed read.
"""

from __future__ import annotations

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import audit, tasks
from mcp_server.identity import Call
from mcp_server.models import AuditAction, TaskComment, utcnow
from mcp_server.schemas import CommentPage, CommentPublic, iso_time
from mcp_server.scopes import Scope


def _public(comment: TaskComment) -> CommentPublic:
    assert comment.id is not None
    return {
        "id": comment.id,
        "task_id": comment.task_id,
        "author": comment.author,
        "body": comment.body,
        "created_at": iso_time(comment.created_at),
    }


async def add_comment(session: AsyncSession, call: Call, task_id: int, body: str) -> CommentPublic:
    task = tasks.live(await tasks.find(session, task_id, scope=call.permissions.projects))
    now = utcnow()
    comment = TaskComment(task_id=task_id, author=call.agent_id, body=body, created_at=now)
    session.add(comment)
    await session.flush()
    session.add(
        audit.entry(call, AuditAction.COMMENTED, now, task, None, {"comment": comment.id, "body": body})
    )
    return _public(comment)


async def list_comments(
    session: AsyncSession, task_id: int, *, after: int | None, limit: int, scope: Scope
) -> CommentPage:
    tasks.live(await tasks.find(session, task_id, scope=scope))
    query = (
        select(TaskComment)
        .where(col(TaskComment.task_id) == task_id, col(TaskComment.id) > (after or 0))
        .order_by(col(TaskComment.id))
        .limit(limit + 1)
    )
    found = list((await session.exec(query)).all())
    page: CommentPage = {"items": [_public(c) for c in found[:limit]], "has_more": len(found) > limit}
    if page["items"]:
        page["last_id"] = page["items"][-1]["id"]
    return page
