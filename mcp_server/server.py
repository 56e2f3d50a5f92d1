"""The MCP server: tool handlers, thin.

Every tools/call goes through the SDK's dispatcher, on every transport. Before a handler runs,
`_guarded` decides the call once (who is calling, with which permissions, under which request
id, from which client) and checks that the caller may call the tool; a refusal is recorded in
the audit log. A handler opens one session, in one transaction, calls one data function and
returns its result. Expected failures become a `ToolError` that tells the agent what to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractContextManager as ContextManager
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Literal, TypeVar, cast

import anyio
from mcp.server._otel import OpenTelemetryMiddleware  # not exported; the SDK documents dropping it
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.settings import AuthSettings, ClientRegistrationOptions, RevocationOptions
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.shared.exceptions import MCPError
from mcp.types import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    CallToolResult,
    CompleteRequestParams,
    CompleteResult,
    Completion,
    ResourceTemplateReference,
    SetLevelRequestParams,
    SubscribeRequestParams,
    SubscriptionsListenRequestParams,
    TextContent,
    ToolAnnotations,
    UnsubscribeRequestParams,
)
from pydantic import ConfigDict, Field, ValidationError, WithJsonSchema
from pydantic_core import to_json, to_jsonable_python
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import (
    __version__,
    arguments,
    audit,
    auth,
    budgets,
    chain,
    changes,
    changesets,
    claims,
    client_logs,
    comments,
    consent,
    dependencies,
    idempotency,
    identity,
    logs,
    oauth,
    project_changes,
    projects,
    refusals,
    resources,
    reverts,
    tasks,
    telemetry,
)
from mcp_server.cancels import CancelSessionless, SessionlessCalls
from mcp_server.checkpoints import CheckpointKeys, Signer
from mcp_server.config import ConfigError, Permissions, Settings
from mcp_server.console import Console
from mcp_server.db import Database, create_database
from mcp_server.errors import (
    DATABASE_ERRORS,
    REFUSED_MESSAGE,
    CommitUnknownError,
    NotFoundError,
    PermissionDeniedError,
    TaskServerError,
    translate_database_error,
)
from mcp_server.filters import MAX_DEPTH, FilterField, FilterNode
from mcp_server.identity import Call
from mcp_server.models import AuditAction, Priority, TaskStatus
from mcp_server.schemas import (
    COUNT_CAP,
    AuditTrail,
    BulkDeleteResult,
    BulkUpdateResult,
    ChangesetApplied,
    ChangesetPublic,
    CommentBody,
    CommentPage,
    CommentPublic,
    Description,
    Id,
    Name,
    OrderBy,
    ProjectChanged,
    ProjectPage,
    ProjectPublic,
    RevertResult,
    RowVersion,
    TaskAsOf,
    TaskClaimed,
    TaskCreate,
    TaskPage,
    TaskPublic,
    TaskUpdate,
    TaskWritten,
    Text,
    UTCTime,
    compact,
    outline,
)
from mcp_server.sealer import SEALER_TASK, Sealer
from mcp_server.verifications import Verifications
from mcp_server.visibility import ToolsTheyMayCall, may_call

logger = logging.getLogger(__name__)

MAX_PAGE_SIZE = 100
COMPLETE = "completion/complete"
READ_RESOURCE = "resources/read"  # the "tool" of a refused resource read's audit entry
MAX_BULK_IDS = 1000

INSTRUCTIONS = (
    "Tasks belong to projects. Find tasks with search_tasks, change them with update_task or "
    "bulk_update_status. Every change is recorded in an audit log under your agent identity "
    "(get_audit_trail). Deleting is soft: restore_task undoes it. If your approval policy holds a "
    "change for a person, its result carries a pending changeset: poll get_changeset."
)


@dataclass(frozen=True)
class AppState:
    """What the lifespan opened: the settings, the database, and the keys of audit checkpoints."""

    settings: Settings
    db: Database
    keys: CheckpointKeys
    sessionless: SessionlessCalls
    client_levels: client_logs.SessionLevels
    verifications: Verifications


@dataclass(frozen=True)
class ToolCall:
    """What a tool handler is given: the call as the edge decided it, and the server's state."""

    call: Call
    app: AppState


@asynccontextmanager
async def _session(request: ToolCall, *, write: bool) -> AsyncIterator[AsyncSession]:
    """The call's session, in one transaction; every expected failure leaves as a ToolError.

    A read-only agent is refused here, where every write begins, whatever the tool's
    annotations say. Permission refusals pass through as they are, for the guard to record.
    """
    if write and request.call.permissions.read_only:
        raise PermissionDeniedError(
            "write", "you are a read-only agent (permission write is missing); nothing was changed"
        )
    async with _transaction(request.app, write=write, request_id=request.call.request_id) as session:
        yield session


@asynccontextmanager
async def _transaction(
    app: AppState, *, write: bool, request_id: str | None = None
) -> AsyncIterator[AsyncSession]:
    """A session in one transaction (db.Database.session); every expected failure leaves as a
    ToolError whose cause is the failure, and permission refusals pass through as they are."""
    try:
        async with app.db.session(write=write) as session:
            yield session
    except PermissionDeniedError:
        raise
    except CommitUnknownError as exc:
        logger.warning("the connection was lost while the call was committing; its outcome is unknown")
        raise ToolError(exc.message(request_id) if request_id else str(exc)) from exc
    except TaskServerError as exc:
        raise ToolError(str(exc)) from exc
    except DATABASE_ERRORS as exc:
        translated = translate_database_error(exc)
        if translated is None:
            logger.exception("the database refused a tool call")
            raise ToolError(REFUSED_MESSAGE) from exc
        logger.warning("tool call failed on the database: %s", type(exc).__name__)
        raise ToolError(str(translated)) from exc


R = TypeVar("R", bound=Mapping[str, Any])


async def _write(
    request: ToolCall,
    key: str | None,
    arguments: dict[str, Any],
    run: Callable[[AsyncSession], Awaitable[R]],
) -> R:
    """One write, in one transaction, within the agent's write budget (budgets.py); with an
    idempotency key, a retry gets the first call's result."""
    async with _session(request, write=True) as session:
        await budgets.check(session, request.call)
        if key is None:
            result = await run(session)
        else:
            result = await idempotency.once(
                session,
                agent_id=request.call.agent_id,
                key=key,
                tool=request.call.tool,
                arguments=arguments,
                ttl=timedelta(seconds=request.app.settings.idempotency_ttl_seconds),
                run=lambda: run(session),
            )
        # A bulk change reports how many rows it changed; any other write changes one.
        if "changed_count" in result:
            changesets.refuse_unheld(request.call, int(result["changed_count"]))
        await budgets.spend(session, request.call, int(result.get("changed_count", 1)))
        return result


# --- parameter types shared by several tools -------------------------------------------------

TaskId = Annotated[Id, Field(description="The task's id.")]
Limit = Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE, description=f"Page size, 1 to {MAX_PAGE_SIZE}.")]
PageToken = Annotated[
    Text | None,
    Field(default=None, max_length=1000, description="From the previous page."),
]
Filter = Annotated[
    FilterNode | None,
    # The tree is described in words: as a recursive JSON schema it cost 2,500 characters of every
    # tool list, and clients with weak JSON Schema support stumble on recursion.
    WithJsonSchema({"type": "object"}),
    Field(
        default=None,
        description=(
            '{"field":F,"op":O,"value":V}, or {"and"|"or":[...]} of these, '
            f"{MAX_DEPTH} deep. F: {', '.join(field.value for field in FilterField)}. "
            "O: eq, ne, in (a list), contains (text), before/after (ISO time), is_null (bool)."
        ),
    ),
]

# What a bulk change reaches: a filter, or the tasks' ids.
BulkFilter = Annotated[Filter, Field(description="As in search_tasks. Give filter or task_ids, not both.")]
TaskIds = Annotated[
    list[Id] | None, Field(min_length=1, max_length=MAX_BULK_IDS, description="The tasks' ids.")
]

IdempotencyKey = Annotated[
    Text | None,
    Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Retry with the same key: no second change.",
    ),
]

FencingToken = Annotated[
    int | None,
    Field(default=None, ge=0, description="Your claim's fencing_token, when you hold the task."),
]
Lease = Annotated[
    int,
    Field(
        ge=claims.MIN_LEASE_SECONDS,
        le=claims.MAX_LEASE_SECONDS,
        description=f"Seconds the claim lasts, {claims.MIN_LEASE_SECONDS} to {claims.MAX_LEASE_SECONDS}.",
    ),
]

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)


# --- tools ------------------------------------------------------------------------------------
# Each handler's first parameter is the ToolCall that `_guarded` builds; the SDK sees it as the
# context parameter (context_kwarg, see `_tool`), so it is no argument of the tool.


async def search_tasks(
    request: ToolCall,
    filter: Filter = None,
    order_by: Annotated[
        list[OrderBy] | None,
        Field(max_length=3, description="Up to 3 sort keys; priority sorts by urgency."),
    ] = None,
    limit: Limit = 20,
    page_token: PageToken = None,
    include_deleted: Annotated[bool, Field(description="Also return soft-deleted tasks.")] = False,
    include_total: Annotated[
        bool,
        Field(description=f"Also count matches (up to {COUNT_CAP:,}); slower."),
    ] = False,
) -> TaskPage:
    """Find tasks, a page at a time, newest first unless order_by says otherwise; deleted ones
    only with include_deleted. Next page: next_page_token as page_token, same filter and order_by."""
    async with _session(request, write=False) as session:
        return await tasks.search_tasks(
            session,
            filter=filter,
            order_by=order_by or [],
            limit=limit,
            page_token=page_token,
            include_deleted=include_deleted,
            include_total=include_total,
            scope=request.call.permissions.projects,
        )


async def get_task(request: ToolCall, task_id: TaskId) -> TaskPublic:
    """One task with its project; a deleted one is an error (restore_task brings it back)."""
    async with _session(request, write=False) as session:
        return await tasks.get_task(session, task_id, request.call.permissions.projects)


async def create_task(
    request: ToolCall,
    title: Annotated[Name, Field(description="Short title.")],
    project_id: Annotated[Id, Field(description="A live project's id (list_projects).")],
    description: Annotated[Description, Field(description="Longer text.")] = "",
    status: Annotated[TaskStatus, Field(description="Initial status.")] = TaskStatus.PENDING,
    priority: Annotated[Priority, Field(description="Urgency.")] = Priority.MEDIUM,
    allow_duplicate: Annotated[
        bool, Field(description="Create it even if a live task in the project has the same title.")
    ] = False,
    idempotency_key: IdempotencyKey = None,
) -> TaskWritten:
    """Create a task in a live project (list_projects, create_project). A live task of the same
    title there (ignoring case, spacing, Unicode forms) refuses it, naming that task."""
    data = TaskCreate(
        title=title, project_id=project_id, description=description, status=status, priority=priority
    )
    return await _write(
        request,
        idempotency_key,
        data.model_dump() | {"allow_duplicate": allow_duplicate},
        lambda session: tasks.create_task(session, request.call, data, allow_duplicate=allow_duplicate),
    )


async def update_task(
    request: ToolCall,
    task_id: TaskId,
    title: Annotated[Name | None, Field(description="New title.")] = None,
    description: Annotated[Description | None, Field(description="New description.")] = None,
    status: Annotated[TaskStatus | None, Field(description="New status.")] = None,
    priority: Annotated[Priority | None, Field(description="New priority.")] = None,
    project_id: Annotated[Id | None, Field(description="Move it to this live project.")] = None,
    expected_version: Annotated[
        RowVersion | None, Field(description="The version you read: if it changed since, nothing changes.")
    ] = None,
    fencing_token: FencingToken = None,
    idempotency_key: IdempotencyKey = None,
) -> TaskWritten:
    """Change some fields of a task, leaving out the rest. With expected_version from your read, a
    change made since is not overwritten (the error shows the task as it is now)."""
    changes = TaskUpdate(
        title=title, description=description, status=status, priority=priority, project_id=project_id
    )
    if changesets.needs_approval(request.call, 1):
        return await _write(
            request,
            idempotency_key,
            {"task_id": task_id, "changes": changes.model_dump(), "expected_version": expected_version},
            lambda session: changesets.hold_update(
                session,
                request.call,
                _changeset_ttl(request),
                task_id,
                changes,
                expected_version=expected_version,
                fencing_token=fencing_token,
            ),
        )
    return await _write(
        request,
        idempotency_key,
        {
            "task_id": task_id,
            "changes": changes.model_dump(),
            "expected_version": expected_version,
            "fencing_token": fencing_token,
        },
        lambda session: tasks.update_task(
            session,
            request.call,
            task_id,
            changes,
            expected_version=expected_version,
            fencing_token=fencing_token,
        ),
    )


async def soft_delete_task(
    request: ToolCall,
    task_id: TaskId,
    fencing_token: FencingToken = None,
    idempotency_key: IdempotencyKey = None,
) -> TaskWritten:
    """Delete a task: it leaves searches and reads, and restore_task brings it back."""
    if changesets.needs_approval(request.call, 1):
        return await _write(
            request,
            idempotency_key,
            {"task_id": task_id},
            lambda session: changesets.hold_deletion(
                session, request.call, _changeset_ttl(request), task_id, fencing_token
            ),
        )
    return await _write(
        request,
        idempotency_key,
        {"task_id": task_id, "fencing_token": fencing_token},
        lambda session: tasks.soft_delete_task(session, request.call, task_id, fencing_token=fencing_token),
    )


async def restore_task(
    request: ToolCall, task_id: TaskId, idempotency_key: IdempotencyKey = None
) -> TaskWritten:
    """Bring back a deleted task."""
    return await _write(
        request,
        idempotency_key,
        {"task_id": task_id},
        lambda session: tasks.restore_task(session, request.call, task_id),
    )


async def bulk_update_status(
    request: ToolCall,
    status: Annotated[TaskStatus, Field(description="The new status.")],
    filter: BulkFilter = None,
    task_ids: TaskIds = None,
    dry_run: Annotated[bool, Field(description="Only report what would change.")] = False,
    idempotency_key: IdempotencyKey = None,
) -> BulkUpdateResult:
    """Set the status of every live task a filter or task_ids names, all or none, but for tasks
    another agent holds; try dry_run first, then apply_changeset. Lists 500 changed ids at most:
    get_audit_trail with its request_id lists all."""
    return await _bulk(
        request,
        idempotency_key,
        {"status": status, "filter": filter, "task_ids": task_ids},
        dry_run=dry_run,
        status=status,
        filter=filter,
        task_ids=task_ids,
        preview=lambda session: tasks.preview_status_change(
            session, request.call, status, filter=filter, task_ids=task_ids
        ),
        change=lambda session: tasks.bulk_update_status(
            session, request.call, status, filter=filter, task_ids=task_ids
        ),
    )


async def bulk_delete_tasks(
    request: ToolCall,
    filter: BulkFilter = None,
    task_ids: TaskIds = None,
    dry_run: Annotated[bool, Field(description="Only report what would be deleted.")] = False,
    idempotency_key: IdempotencyKey = None,
) -> BulkDeleteResult:
    """Delete every live task a filter or task_ids names, all or none, but for tasks another agent
    holds; try dry_run first. restore_task brings one back."""
    return await _bulk(
        request,
        idempotency_key,
        {"filter": filter, "task_ids": task_ids},
        dry_run=dry_run,
        status=None,
        filter=filter,
        task_ids=task_ids,
        preview=lambda session: tasks.preview_deletion(
            session, request.call, filter=filter, task_ids=task_ids
        ),
        change=lambda session: tasks.bulk_delete_tasks(
            session, request.call, filter=filter, task_ids=task_ids
        ),
    )


B = TypeVar("B", BulkUpdateResult, BulkDeleteResult)


async def _bulk(
    request: ToolCall,
    key: str | None,
    arguments: dict[str, Any],
    *,
    dry_run: bool,
    status: TaskStatus | None,
    filter: FilterNode | None,
    task_ids: list[int] | None,
    preview: Callable[[AsyncSession], Awaitable[B]],
    change: Callable[[AsyncSession], Awaitable[B]],
) -> B:
    """A bulk change, its preview, or its hold for approval (changesets.py).

    A dry run writes the changeset that binds what it shows, unless the agent is read-only (it
    could never apply one): then it only reads. An agent with an approval policy has every change
    counted into a changeset first, and held when the policy says so."""
    call = request.call
    ttl = _changeset_ttl(request)
    if dry_run and call.permissions.read_only:
        async with _session(request, write=False) as session:
            return await preview(session)
    if dry_run:
        async with _session(request, write=True) as session:
            shown = await changesets.preview(
                session, call, ttl, status=status, filter=filter, task_ids=task_ids
            )
            return cast(B, shown)
    if call.permissions.approval_over_rows is None:
        return await _write(request, key, arguments, change)
    return cast(
        B,
        await _write(
            request,
            key,
            arguments,
            lambda session: changesets.change_or_hold(
                session, call, ttl, lambda: change(session), status=status, filter=filter, task_ids=task_ids
            ),
        ),
    )


def _changeset_ttl(request: ToolCall) -> timedelta:
    return timedelta(seconds=request.app.settings.changeset_ttl_seconds)


ChangesetId = Annotated[Text, Field(max_length=32, description="From a dry run's result.")]


async def apply_changeset(request: ToolCall, changeset_id: ChangesetId) -> ChangesetApplied:
    """Apply a dry run's changeset: exactly its tasks, or nothing if any changed since."""
    return await _write(
        request, None, {}, lambda session: changesets.apply_own(session, request.call, changeset_id)
    )


async def get_changeset(request: ToolCall, changeset_id: ChangesetId) -> ChangesetPublic:
    """One of your changesets: its state, tasks, before and after."""
    async with _session(request, write=False) as session:
        return await changesets.get_changeset(session, changeset_id, created_by=request.call.agent_id)


async def revert_request(
    request: ToolCall,
    request_id: Annotated[
        Text, Field(max_length=64, description="The call to undo (its result's request_id).")
    ],
    atomic: Annotated[bool, Field(description="Refuse it all if any task cannot be put back.")] = False,
) -> RevertResult:
    """Undo one call's task changes from the audit log, as a new change. A task changed since is
    left, and listed with who changed it."""
    return await _write(
        request,
        None,
        {},
        lambda session: reverts.revert_request(session, request.call, request_id, atomic=atomic),
    )


async def get_task_as_of(
    request: ToolCall,
    task_id: TaskId,
    at: Annotated[UTCTime, Field(description="The time (ISO 8601).")],
) -> TaskAsOf:
    """A task as it was at a time, rebuilt from its audit trail, deleted or not."""
    async with _session(request, write=False) as session:
        return await reverts.task_as_of(session, task_id, at, request.call.permissions.projects)


async def claim_task(
    request: ToolCall,
    task_id: Annotated[Id | None, Field(description="This task; without it, the next free one.")] = None,
    filter: Annotated[Filter, Field(description="As in search_tasks: which tasks may be taken.")] = None,
    order_by: Annotated[
        list[OrderBy] | None,
        Field(max_length=3, description="Which comes next; default most urgent, then oldest."),
    ] = None,
    lease_seconds: Lease = claims.DEFAULT_LEASE_SECONDS,
) -> TaskClaimed:
    """Take a pending or in_progress task: no other agent changes it until the lease ends.
    Without task_id, the next one nobody holds. Pass claim.fencing_token with your changes;
    renew_claim before it expires, release_claim when done (completing releases it)."""
    return await _write(
        request,
        None,
        {},
        lambda session: claims.claim_task(
            session,
            request.call,
            task_id=task_id,
            filter=filter,
            order_by=order_by or [],
            lease_seconds=lease_seconds,
        ),
    )


async def renew_claim(
    request: ToolCall,
    task_id: TaskId,
    fencing_token: Annotated[int, Field(ge=0, description="Your claim's fencing_token.")],
    lease_seconds: Lease = claims.DEFAULT_LEASE_SECONDS,
) -> TaskClaimed:
    """Extend your claim on a task to lease_seconds from now."""
    return await _write(
        request,
        None,
        {},
        lambda session: claims.renew_claim(session, request.call, task_id, fencing_token, lease_seconds),
    )


async def release_claim(
    request: ToolCall,
    task_id: TaskId,
    fencing_token: Annotated[int, Field(ge=0, description="Your claim's fencing_token.")],
) -> TaskWritten:
    """Give up your claim on a task, so another agent may take it."""
    return await _write(
        request,
        None,
        {},
        lambda session: claims.release_claim(session, request.call, task_id, fencing_token),
    )


async def add_dependency(
    request: ToolCall,
    task_id: TaskId,
    blocked_by: Annotated[Id, Field(description="The task it must wait for.")],
) -> TaskWritten:
    """Make a task wait for another: it cannot start or complete, nor be claimed, until that one
    is completed, cancelled or deleted. A cycle is refused."""
    return await _write(
        request,
        None,
        {},
        lambda session: dependencies.add_dependency(session, request.call, task_id, blocked_by),
    )


async def remove_dependency(
    request: ToolCall,
    task_id: TaskId,
    blocked_by: Annotated[Id, Field(description="The task it no longer waits for.")],
) -> TaskWritten:
    """Stop a task waiting for another."""
    return await _write(
        request,
        None,
        {},
        lambda session: dependencies.remove_dependency(session, request.call, task_id, blocked_by),
    )


async def add_comment(
    request: ToolCall,
    task_id: TaskId,
    body: Annotated[CommentBody, Field(description="What the next agent should know.")],
) -> CommentPublic:
    """Leave a comment on a live task, under your agent identity; comments are never changed."""
    return await _write(
        request, None, {}, lambda session: comments.add_comment(session, request.call, task_id, body)
    )


async def list_comments(
    request: ToolCall,
    task_id: TaskId,
    after: Annotated[Id | None, Field(description="Only comments after this one (a last_id).")] = None,
    limit: Limit = 20,
) -> CommentPage:
    """A task's comments, oldest first; with after, only what was said since."""
    async with _session(request, write=False) as session:
        return await comments.list_comments(
            session, task_id, after=after, limit=limit, scope=request.call.permissions.projects
        )


async def get_audit_trail(
    request: ToolCall,
    entity_id: Annotated[Id | None, Field(description="A task's or project's history.")] = None,
    request_id: Annotated[
        Text | None, Field(max_length=64, description="One call's changes (its result's request_id).")
    ] = None,
    changed_by: Annotated[
        Text | None, Field(max_length=identity.MAX_LENGTH, description="An agent's entries.")
    ] = None,
    action: Annotated[AuditAction | None, Field(description="Entries of this kind.")] = None,
    since: Annotated[UTCTime | None, Field(description="From this time on.")] = None,
    until: Annotated[UTCTime | None, Field(description="Before this time.")] = None,
    limit: Limit = 50,
    page_token: PageToken = None,
) -> AuditTrail:
    """Who changed what and when, with the values before and after, newest first. `refused`: a
    call lacking permission."""
    async with _session(request, write=False) as session:
        return await audit.get_audit_trail(
            session,
            entity_id=entity_id,
            request_id=request_id,
            changed_by=changed_by,
            action=action,
            since=since,
            until=until,
            limit=limit,
            page_token=page_token,
            scope=request.call.permissions.projects,
        )


async def verify_audit_log(request: ToolCall) -> chain.ChainReport:
    """Check the audit chain and checkpoints: the first entry changed, removed or added outside
    the server."""
    async with (
        request.app.verifications.turn(request.call.agent_id) as turn,
        _session(request, write=False) as session,
    ):
        turn.report = await chain.verify(session, request.app.keys, start=turn.start)
        return turn.report


async def create_project(
    request: ToolCall,
    name: Annotated[Name, Field(description="Unique among live projects.")],
    description: Annotated[Description, Field(description="Longer text.")] = "",
    idempotency_key: IdempotencyKey = None,
) -> ProjectPublic:
    """Create a project to hold tasks."""
    return await _write(
        request,
        idempotency_key,
        {"name": name, "description": description},
        lambda session: projects.create_project(session, request.call, name, description),
    )


ProjectId = Annotated[Id, Field(description="The project's id.")]


async def delete_project(
    request: ToolCall,
    project_id: ProjectId,
    live_tasks: Annotated[
        Literal["delete", "move"] | None,
        Field(description="Required if it has live tasks: delete them too, or move them (move_to)."),
    ] = None,
    move_to: Annotated[Id | None, Field(description="With live_tasks=move: the project they go to.")] = None,
    idempotency_key: IdempotencyKey = None,
) -> ProjectChanged:
    """Delete a project; restore_project brings it back with the tasks deleted with it."""
    return await _write(
        request,
        idempotency_key,
        {"project_id": project_id, "live_tasks": live_tasks, "move_to": move_to},
        lambda session: project_changes.delete_project(
            session, request.call, project_id, live_tasks=live_tasks, move_to=move_to
        ),
    )


async def restore_project(
    request: ToolCall, project_id: ProjectId, idempotency_key: IdempotencyKey = None
) -> ProjectChanged:
    """Bring back a deleted project, and the tasks its deletion deleted."""
    return await _write(
        request,
        idempotency_key,
        {"project_id": project_id},
        lambda session: project_changes.restore_project(session, request.call, project_id),
    )


async def rename_project(
    request: ToolCall,
    project_id: ProjectId,
    name: Annotated[Name, Field(description="Unique among live projects.")],
    idempotency_key: IdempotencyKey = None,
) -> ProjectChanged:
    """Give a live project a new name."""
    return await _write(
        request,
        idempotency_key,
        {"project_id": project_id, "name": name},
        lambda session: project_changes.rename_project(session, request.call, project_id, name),
    )


async def list_projects(
    request: ToolCall,
    name_contains: Annotated[Name | None, Field(description="Only names containing this.")] = None,
    limit: Limit = 50,
    page_token: PageToken = None,
) -> ProjectPage:
    """Live projects by name, a page at a time."""
    async with _session(request, write=False) as session:
        return await projects.list_projects(
            session,
            name_contains=name_contains,
            limit=limit,
            page_token=page_token,
            scope=request.call.permissions.projects,
        )


async def _read_resource(ctx: ToolContext, tool: str, read: resources.Read) -> str:
    """A resource read as `tool` would read the same thing: the verified agent, who must be allowed
    to call `tool`, one read session, the value as JSON; a failure as a resource error."""
    app: AppState = ctx.request_context.lifespan_context
    _, permissions = _agent_of(app.settings, ctx.request_context.request)
    # Refusals are recorded as a refused tool call is; the entry names the URI asked for.
    uri = str((ctx.request_context.params or {}).get("uri", ""))
    if not may_call(permissions, tool, writes=False):
        recorded = await _record_refusal(app, _call_of(ctx, READ_RESOURCE), f"tool:{tool}", {"uri": uri})
        raise MCPError(  # a refusal, not a failure of the server's (a ResourceError is -32603)
            code=INVALID_REQUEST,
            message=f"permission denied: this shows what {tool} shows (permission tool:{tool} is missing). "
            + _recorded_or_not(recorded),
        )
    try:
        async with _transaction(app, write=False) as session:
            value = await read(session, permissions.projects)
    except PermissionDeniedError as exc:
        recorded = await _record_refusal(app, _call_of(ctx, READ_RESOURCE), exc.permission, {"uri": uri})
        raise MCPError(
            code=INVALID_REQUEST, message=f"permission denied: {exc}. {_recorded_or_not(recorded)}"
        ) from None
    except ToolError as exc:
        missing = isinstance(exc.__cause__, NotFoundError)
        raise (ResourceNotFoundError if missing else ResourceError)(str(exc)) from None
    return to_json(value).decode()


async def _complete(
    ctx: ServerRequestContext[AppState, Any], params: CompleteRequestParams
) -> CompleteResult:
    """completion/complete of a resource template's argument: the values the calling agent could
    read (a project id needs list_projects), through one read session."""
    app = ctx.lifespan_context
    _, permissions = _agent_of(app.settings, ctx.request)
    ref = params.ref
    if not isinstance(ref, ResourceTemplateReference) or not may_call(
        permissions, "list_projects", writes=False
    ):
        return CompleteResult(completion=Completion(values=[]))
    try:
        async with _transaction(app, write=False) as session:
            completion = await resources.complete(
                session, ref.uri, params.argument.name, params.argument.value, permissions.projects
            )
    except ToolError as exc:
        raise MCPError(code=INTERNAL_ERROR, message=str(exc)) from None
    return CompleteResult(completion=completion)


def _annotations(*, destructive: bool, idempotent: bool) -> ToolAnnotations:
    """A writing tool's hints, leaving out what the protocol assumes when a hint is absent (not
    read-only, destructive, not idempotent)."""
    return ToolAnnotations(
        destructive_hint=None if destructive else False,
        idempotent_hint=True if idempotent else None,
        open_world_hint=False,
    )


TOOLS: list[tuple[Callable[..., Any], str, ToolAnnotations]] = [
    (search_tasks, "Search tasks", READ_ONLY),
    (get_task, "Get a task", READ_ONLY),
    (get_task_as_of, "A task as it was", READ_ONLY),
    (create_task, "Create a task", _annotations(destructive=False, idempotent=False)),
    (update_task, "Update a task", _annotations(destructive=True, idempotent=True)),
    (soft_delete_task, "Delete a task", _annotations(destructive=True, idempotent=True)),
    (restore_task, "Restore a task", _annotations(destructive=False, idempotent=True)),
    (bulk_update_status, "Bulk status change", _annotations(destructive=True, idempotent=True)),
    (bulk_delete_tasks, "Bulk delete", _annotations(destructive=True, idempotent=True)),
    (apply_changeset, "Apply a changeset", _annotations(destructive=True, idempotent=False)),
    (get_changeset, "Get a changeset", READ_ONLY),
    (revert_request, "Revert a call", _annotations(destructive=True, idempotent=False)),
    (claim_task, "Claim a task", _annotations(destructive=False, idempotent=False)),
    (renew_claim, "Renew a claim", _annotations(destructive=False, idempotent=True)),
    (release_claim, "Release a claim", _annotations(destructive=False, idempotent=True)),
    (add_dependency, "Add a dependency", _annotations(destructive=False, idempotent=True)),
    (remove_dependency, "Remove a dependency", _annotations(destructive=True, idempotent=True)),
    (add_comment, "Comment on a task", _annotations(destructive=False, idempotent=False)),
    (list_comments, "List comments", READ_ONLY),
    (get_audit_trail, "Audit trail", READ_ONLY),
    (verify_audit_log, "Verify the audit log", READ_ONLY),
    (create_project, "Create a project", _annotations(destructive=False, idempotent=False)),
    (rename_project, "Rename a project", _annotations(destructive=True, idempotent=True)),
    (delete_project, "Delete a project", _annotations(destructive=True, idempotent=True)),
    (restore_project, "Restore a project", _annotations(destructive=False, idempotent=True)),
    (list_projects, "List projects", READ_ONLY),
]


TOOL_NAMES = frozenset(fn.__name__ for fn, _, _ in TOOLS)


def _tool(fn: Callable[..., Any], title: str, annotations: ToolAnnotations) -> Tool:
    description = " ".join((fn.__doc__ or "").split())  # one line: indentation is tokens too
    tool = Tool.from_function(
        fn,
        title=title,
        description=description,
        # The SDK hands its Context to this parameter, and it is no argument of the tool; _guarded
        # turns the Context into the handler's ToolCall.
        context_kwarg="request",
        annotations=annotations,
        structured_output=True,
    )
    # Unknown arguments are an error the agent should see, not something silently dropped.
    loose = tool.fn_metadata.arg_model
    strict = cast(
        type[ArgModelBase],
        type(
            loose.__name__,
            (loose,),
            {
                "model_config": ConfigDict(extra="forbid", arbitrary_types_allowed=True),
                "__module__": __name__,
            },
        ),
    )
    tool.parameters = compact(strict.model_json_schema(by_alias=True))
    # The SDK passes the arguments on as they came, and _guarded checks them against the tool's
    # own model, so that a mistake is told in the agent's terms (arguments.explain), not pydantic's.
    checked = FuncMetadata(arg_model=strict)
    tool.fn_metadata.arg_model = _AsSent
    # The data functions build results that match their TypedDicts, and _guarded dumps each once;
    # without the model the SDK still publishes the output schema but no longer validates and
    # dumps the result again.
    tool.fn_metadata.output_model = None
    if tool.fn_metadata.output_schema is not None:
        tool.fn_metadata.output_schema = outline(tool.fn_metadata.output_schema)
    tool.fn = _guarded(tool.name, tool.fn, checked)
    return tool


class _AsSent(ArgModelBase):
    """A tool call's arguments as the client sent them, for `_guarded` to check: the SDK checks
    none of them and hands them over as one argument, `arguments`."""

    model_config = ConfigDict(extra="allow")

    def model_dump_one_level(self) -> dict[str, Any]:
        return {"arguments": dict(self.model_extra or {})}


def _check(tool: str, checked: FuncMetadata, sent: dict[str, Any]) -> dict[str, Any]:
    """The arguments `sent` to `tool`, checked and converted by the tool's own model (a JSON
    string where an object or list belongs is read as JSON first, as the SDK does); a ToolError
    in the agent's terms when they do not fit."""
    try:
        return checked.validate_arguments(sent)
    except ValidationError as exc:
        names = [field.alias or name for name, field in checked.arg_model.model_fields.items()]
        raise ToolError(arguments.explain(tool, names, exc)) from None


def _result(value: Mapping[str, Any]) -> CallToolResult:
    """Structured content, and the same JSON as text for clients that read only text: compact,
    since every character of it is a token the agent pays for."""
    structured = dict(value)
    return CallToolResult(
        content=[TextContent(type="text", text=to_json(structured).decode())],
        structured_content=structured,
    )


ToolContext = Context[AppState, Any]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _agent_of(settings: Settings, http_request: Any = None) -> tuple[str, Permissions]:
    """Who is calling: the agent a verified token proves over HTTP, the configured one otherwise;
    never an argument. A middleware, which runs outside the handler's context, passes the HTTP
    request that carried the message, on which the SDK's authentication left the verified user."""
    token = get_access_token()
    if token is None and http_request is not None:
        token = getattr(http_request.scope.get("user"), "access_token", None)
    if isinstance(token, auth.AgentToken):
        return token.agent_id, token.permissions
    return identity.configured_agent(settings)


def _call_of(ctx: ToolContext, tool: str) -> Call:
    """The call as this server decides it, once: who is calling (`_agent_of`), with which
    permissions, under a new request id, from the client that named itself so."""
    agent_id, permissions = _agent_of(ctx.request_context.lifespan_context.settings)
    params = ctx.session.client_params
    return Call(
        tool=tool,
        agent_id=agent_id,
        permissions=permissions,
        request_id=identity.new_request_id(),
        client_name=identity.client_name(params.client_info.name if params is not None else None),
        progress=ctx.report_progress,  # sent only when the client asked, with a progress token
    )


CANCELLED_MESSAGE = "the call was cancelled by its client before it finished; nothing was changed"
# A commit, once begun, completes (db.Database.session), so a call cancelled is one not committed.
CANCELLED_LOG = "the call was cancelled before it committed; its transaction was rolled back"


def _cancellable(request: ToolContext, app: AppState, call: Call) -> ContextManager[anyio.CancelScope | None]:
    """Where a `notifications/cancelled` cannot reach the call through the SDK (stateless HTTP,
    handshake era: cancels.py), the scope it cancels instead; elsewhere nothing."""
    context = request.request_context
    if not app.settings.http_stateless or context.request is None or context.request_id is None:
        return contextlib.nullcontext()
    return app.sessionless.running(call.agent_id, context.request_id)


def _guarded(
    name: str, fn: Callable[..., Awaitable[Mapping[str, Any]]], checked: FuncMetadata
) -> Callable[..., Any]:
    """The tool function behind its arguments' check (`_check`) and a permission check; a refused
    call is recorded, then reported.

    The call is decided here (`_call_of`). Its log records carry its request id and the agent's
    identity, and so does the trace span the SDK opened for it, with the outcome (when tracing
    is on).
    """

    async def guarded(request: ToolContext, arguments: dict[str, Any]) -> CallToolResult:
        call = _call_of(request, name)
        app: AppState = request.request_context.lifespan_context
        outcome = "error"
        values: dict[str, Any] | None = None  # the arguments, once checked
        with logs.calling(call) as held:
            try:
                # May they call it at all, before anything of it is checked: a tool an agent may not
                # call tells it nothing, its arguments included.
                if call.permissions.tools is not None and name not in call.permissions.tools:
                    raise PermissionDeniedError(
                        f"tool:{name}", f"you may not call {name} (permission tool:{name} is missing)"
                    )
                values = _check(name, checked, arguments)
                with _cancellable(request, app, call) as cancelled:
                    value = await fn(ToolCall(call, app), **values)
                if cancelled is not None and cancelled.cancelled_caught:
                    outcome = "cancelled"
                    logger.info(CANCELLED_LOG)
                    raise ToolError(CANCELLED_MESSAGE)
                result = _result(value)
                outcome = "ok"
                return result
            except PermissionDeniedError as exc:
                outcome = "refused"
                logger.info("refused: permission %s is missing", exc.permission)
                said = values if values is not None else _recordable(checked, arguments)
                recorded = await _record_refusal(app, call, exc.permission, said)
                raise ToolError(f"permission denied: {exc}. {_recorded_or_not(recorded)}") from None
            except anyio.get_cancelled_exc_class():
                outcome = "cancelled"
                logger.info(CANCELLED_LOG)
                raise
            finally:
                telemetry.describe_call(call, outcome)
                if held and outcome != "cancelled":  # a cancelled call sends nothing more
                    await client_logs.send(request, held, app.client_levels.least(request))

    return guarded


def _recorded_or_not(recorded: refusals.Recorded | None) -> str:
    if recorded is None:
        return "The attempt could not be recorded in the audit log."
    if recorded.entry:
        return "The attempt is recorded in the audit log."
    return (
        f"The attempt is counted: {recorded.repeats} like it since the one recorded in the audit log "
        "this window."
    )


def _recordable(checked: FuncMetadata, arguments: dict[str, Any]) -> dict[str, Any]:
    """What the audit entry of a call refused before its arguments were checked records of them:
    their checked values (bounded by the tool's own limits), or only their names when they do not
    pass the check."""
    try:
        return checked.validate_arguments(arguments)
    except ValidationError:
        return {"argument_names": sorted(str(key) for key in arguments)[:50]}


# A refusal that could not be recorded, or whose record's commit went unanswered: refused either way.
_UNRECORDED: tuple[type[Exception], ...] = (*DATABASE_ERRORS, CommitUnknownError)


async def _record_refusal(
    app: AppState, call: Call, permission: str, arguments: dict[str, Any]
) -> refusals.Recorded | None:
    """Record a refused call in a transaction of its own (the call's own rolled back): an entry, or
    a repeat counted (refusals.py); None when it could not be recorded."""
    recorded = to_jsonable_python({k: v for k, v in arguments.items() if v is not None}, by_alias=True)
    window = timedelta(seconds=app.settings.refusal_window_seconds)
    try:
        async with app.db.session(write=True) as session:
            return await refusals.record(session, call, permission, recorded, window)
    except _UNRECORDED:
        logger.exception("could not record a refused call to %s", call.tool)
        return None


def _oauth(settings: Settings) -> AuthSettings:
    """What the SDK publishes for OAuth clients (RFC 9728). With the built-in authorization server
    (oauth.py): its own metadata (RFC 8414), registration, token and revocation endpoints, and
    Protected Resource Metadata naming it. With JWTs from an identity provider:
    Protected Resource Metadata at /.well-known/oauth-protected-resource/mcp naming that issuer as
    the authorization server, and its URL in every 401's WWW-Authenticate, so an OAuth client finds
    where to get a token. The token's audience is checked by our verifier (auth.py), not by the
    SDK's resource check. Static tokens alone have no issuer to point at: nothing is published."""
    if settings.oauth is not None:
        return AuthSettings(
            issuer_url=settings.issuer_url,
            resource_server_url=settings.resource_url,
            client_registration_options=ClientRegistrationOptions(enabled=True),
            revocation_options=RevocationOptions(enabled=True),
            validate_token_resource=False,  # the provider issues tokens for this resource only
        )
    if settings.jwt is None or not settings.jwt.issuer.startswith(("https://", "http://")):
        # issuer_url is required by the SDK but published only with resource_server_url.
        return AuthSettings(issuer_url="http://localhost", resource_server_url=None)
    return AuthSettings(
        issuer_url=settings.jwt.issuer,
        resource_server_url=settings.resource_url,
        validate_token_resource=False,
    )


def check_tool_names(settings: Settings) -> None:
    """Every tool name the settings mention is one this server has."""
    named = {"tools": settings.tools or frozenset()}
    named |= {f"agents[{agent.id}].tools": agent.tools or frozenset() for agent in settings.agents}
    if settings.jwt is not None:
        named |= {f"jwt.scopes[{s}].tools": p.tools or frozenset() for s, p in settings.jwt.scopes.items()}
    for where, names in named.items():
        if unknown := sorted(names - TOOL_NAMES):
            raise ConfigError(
                f"{where} names unknown tools: {', '.join(unknown)}; known: {', '.join(sorted(TOOL_NAMES))}"
            )


def create_server(settings: Settings) -> MCPServer[AppState]:
    check_tool_names(settings)
    # Only HTTP requests carry tokens; stdio and in-process clients never meet the verifier.
    verifier = auth.AgentTokenVerifier(settings) if settings.checks_tokens else None
    # The built-in authorization server verifies every token itself: static ones through `verifier`.
    provider = (
        oauth.BuiltInAuthorization(settings, verifier)
        if verifier is not None and settings.oauth is not None
        else None
    )
    console = Console(settings) if settings.console is not None else None
    sessionless = SessionlessCalls()
    client_levels = client_logs.SessionLevels()
    bus = InMemorySubscriptionBus()  # this process's listen streams; the audit chain connects processes
    subscriptions = changes.Subscriptions(
        lambda ctx, tool: may_call(_agent_of(settings, ctx.request)[1], tool, writes=False),
        lambda ctx: _agent_of(settings, ctx.request)[1].projects,
        settings.change_poll_ms / 1000,
        bus,
    )

    @asynccontextmanager
    async def lifespan(server: MCPServer[AppState]) -> AsyncIterator[AppState]:
        signer = Signer.of(settings)
        keys = CheckpointKeys.load(signer, settings.audit_public_key_files)
        db = create_database(settings)
        sealing: Sealer | None = None
        task: asyncio.Task[None] | None = None
        try:
            # The embedded SQLite file belongs to this server: nobody else is there to migrate it.
            await db.open_schema(upgrade=db.is_sqlite)
            subscriptions.open(db)
            if provider is not None:
                provider.open(db)
            if console is not None:
                console.open(db, keys)
            if settings.sealer:
                sealing = Sealer(db, settings, signer)
                task = asyncio.create_task(sealing.run(), name=SEALER_TASK)
            yield AppState(
                settings=settings,
                db=db,
                keys=keys,
                sessionless=sessionless,
                client_levels=client_levels,
                verifications=Verifications(
                    settings.verify_interval_seconds, settings.verify_full_interval_seconds
                ),
            )
        finally:
            if sealing is not None and task is not None:
                # Even when the server is being cancelled: let the round under way finish (it is
                # short) and hand the lease on, so another server's sealer need not wait it out.
                sealing.stop()
                with anyio.move_on_after(10, shield=True), contextlib.suppress(*DATABASE_ERRORS):
                    await task
                    await sealing.release()
                task.cancel()
            await subscriptions.close()
            await db.dispose()

    server = MCPServer(
        name="tasks",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        log_level=cast(LogLevel, settings.log_level),
        tools=[
            _tool(fn, title, annotations)
            for fn, title, annotations in TOOLS
            if settings.tools is None or fn.__name__ in settings.tools
        ],
        token_verifier=verifier if provider is None else None,
        auth_server_provider=provider,
        auth=_oauth(settings) if verifier is not None else None,
        # subscriptions/listen (2026-07-28): resource changes, published by changes.Subscriptions.
        # Tools and resources never change their lists, so no list-changed event is ever sent.
        subscriptions=bus,
    )
    # The server has no prompts; without their handlers it declares none, and prompts/get of any
    # name is "method not found" rather than a crash. (The SDK registers them unconditionally.)
    for method in ("prompts/list", "prompts/get"):
        server._lowlevel_server._request_handlers.pop(method, None)
    server._lowlevel_server.add_request_handler(
        client_logs.SET_LEVEL, SetLevelRequestParams, client_levels.set_level
    )
    server._lowlevel_server.add_request_handler(COMPLETE, CompleteRequestParams, _complete)
    # The SDK's listen handler, behind the check that the agent may read what it listens to.
    server._lowlevel_server.add_request_handler(
        changes.LISTEN, SubscriptionsListenRequestParams, subscriptions.listen
    )
    if not settings.http_stateless:  # a stateless server has no session to send changes to
        lowlevel = server._lowlevel_server
        lowlevel.add_request_handler(changes.SUBSCRIBE, SubscribeRequestParams, subscriptions.subscribe)
        lowlevel.add_request_handler(changes.UNSUBSCRIBE, UnsubscribeRequestParams, subscriptions.unsubscribe)
    if not telemetry.tracing():
        # No OpenTelemetry SDK is set up, so the span the SDK opens around every message goes
        # nowhere; it would still cost each call about 40 µs.
        server.middleware[:] = [m for m in server.middleware if not isinstance(m, OpenTelemetryMiddleware)]
    if settings.http_stateless:
        server.middleware.append(CancelSessionless(sessionless, lambda: _agent_of(settings)[0]))
    resources.register(server, _read_resource)
    if provider is not None:
        for path, endpoint, methods in consent.routes(provider, settings):
            server.custom_route(path, methods=methods)(endpoint)
    if console is not None:
        for path, endpoint, methods in console.routes():
            server.custom_route(path, methods=methods)(endpoint)
    writing = frozenset(fn.__name__ for fn, _, annotations in TOOLS if not annotations.read_only_hint)
    server.middleware.append(ToolsTheyMayCall(lambda ctx: _agent_of(settings, ctx.request)[1], writing))
    return server
