"""Task data as MCP resources, for clients that attach what they read to a conversation.

- `task://{task_id}`: a live task with its project, as get_task shows it;
- `project://{project_id}`: a live project, as list_projects shows it;
- `project://{project_id}/tasks`: its newest live tasks, a page of search_tasks (the first 100;
  search_tasks with a project_id filter pages through the rest).

Each is JSON, read through the same session and data functions as the tool that shows the same
thing, and an agent may read it when it may call that tool (`Reader`, given by the server). There
is no list of concrete resources: a million tasks are no list to hand a client; the templates say
how to name one.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.types import Completion
from sqlalchemy import String, bindparam, cast
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import projects, tasks
from mcp_server.filters import Condition, FilterField, Operator
from mcp_server.models import Project
from mcp_server.schemas import MAX_ID
from mcp_server.scopes import Scope
from mcp_server.sql import one_of

JSON = "application/json"
PROJECT_TASKS_PAGE = 100

# A read in the reader's session, within its projects (scopes.py).
Read = Callable[[AsyncSession, Scope], Awaitable[Mapping[str, Any]]]
# The server's part: who is reading, may they (as the named tool), one read session, the result as JSON.
Reader = Callable[[Context[Any, Any], str, Read], Awaitable[str]]


def register(server: MCPServer[Any], reader: Reader) -> None:
    @server.resource(
        "task://{task_id}",
        name="task",
        title="A task",
        description="A live task with its project, as get_task shows it.",
        mime_type=JSON,
    )
    async def task(task_id: str, ctx: Context[Any, Any]) -> str:
        number = _id("task", task_id)
        return await reader(ctx, "get_task", lambda session, scope: tasks.get_task(session, number, scope))

    @server.resource(
        "project://{project_id}",
        name="project",
        title="A project",
        description="A live project, as list_projects shows it.",
        mime_type=JSON,
    )
    async def project(project_id: str, ctx: Context[Any, Any]) -> str:
        number = _id("project", project_id)

        async def read(session: AsyncSession, scope: Scope) -> Mapping[str, Any]:
            return projects.project_public(await projects.load_live(session, number, scope))

        return await reader(ctx, "list_projects", read)

    @server.resource(
        "project://{project_id}/tasks",
        name="project_tasks",
        title="A project's tasks",
        description=f"A project's newest {PROJECT_TASKS_PAGE} live tasks; search_tasks pages on.",
        mime_type=JSON,
    )
    async def project_tasks(project_id: str, ctx: Context[Any, Any]) -> str:
        number = _id("project", project_id)
        in_project = Condition(field=FilterField.PROJECT_ID, op=Operator.EQ, value=number)

        async def read(session: AsyncSession, scope: Scope) -> Mapping[str, Any]:
            # A missing project is an error, not an empty list; one outside the scope, a refusal.
            await projects.load_live(session, number, scope)
            return await tasks.search_tasks(
                session,
                filter=in_project,
                order_by=[],
                limit=PROJECT_TASKS_PAGE,
                page_token=None,
                include_deleted=False,
                include_total=False,
                scope=scope,
            )

        return await reader(ctx, "search_tasks", read)


# Completing a template's argument: the live projects whose id starts with what was typed, in id
# order. A task id has no such short list (a million tasks), so it completes to nothing.
PROJECT_TEMPLATES = frozenset({"project://{project_id}", "project://{project_id}/tasks"})
MOST_COMPLETIONS = 100  # the protocol's most values in one answer


_PROJECT_IDS = (
    select(Project.id)
    .where(cast(col(Project.id), String).startswith(bindparam("prefix", type_=String)))
    .order_by(col(Project.id))
    .limit(MOST_COMPLETIONS + 1)
)
_PROJECT_IDS_IN_SCOPE = _PROJECT_IDS.where(one_of(col(Project.id), "scope"))


async def complete(
    session: AsyncSession, template: str, argument: str, typed: str, scope: Scope
) -> Completion:
    """The values `argument` of `template` may take that begin with `typed`, within `scope`."""
    if template not in PROJECT_TEMPLATES or argument != "project_id" or not (typed == "" or typed.isdigit()):
        return Completion(values=[])
    if scope is None:
        ids = (await session.exec(_PROJECT_IDS, params={"prefix": typed})).all()
    else:
        found = await session.exec(_PROJECT_IDS_IN_SCOPE, params={"prefix": typed, "scope": sorted(scope)})
        ids = found.all()
    return Completion(
        values=[str(project_id) for project_id in ids[:MOST_COMPLETIONS]],
        has_more=len(ids) > MOST_COMPLETIONS,
    )


_ID = re.compile(r"[1-9][0-9]{0,15}")  # ASCII digits, no leading zero


def resource_id(text: str) -> int | None:
    """The id a resource URI names (for reads here, for subscriptions in changes.py); None if none."""
    if _ID.fullmatch(text) is None or int(text) > MAX_ID:
        return None
    return int(text)


def _id(kind: str, text: str) -> int:
    if (number := resource_id(text)) is None:
        raise ResourceNotFoundError(
            f"{kind} ids are whole numbers from 1 to {MAX_ID}, as in {kind}://42; got {text!r}"
        )
    return number
