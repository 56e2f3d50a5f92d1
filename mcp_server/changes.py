"""Resource subscriptions: a client hears that a task or project it subscribed to has changed,
whichever agent or server process changed it.

Changes are read from the audit chain, not announced by the writers: every committed change has
its audit entries, and the sealer gives them positions (`audit_seal.seq`) in commit order, with
no gaps. While one of its clients holds a subscription, a server process reads what was sealed
since it last looked, every `change_poll_ms`, and only for what its clients subscribed to. So
writers pay nothing for it (a NOTIFY would serialize every committing writer on PostgreSQL's
notification queue), a change made by any process on the database is seen, a rolled-back one
never is, and none is missed or seen twice. A change is heard within the seal delay plus one
poll (well under a second at the defaults); with no sealer running anywhere, none is.

What a change touches: `task://{id}` of each task changed; `project://{id}/tasks` of the project
each task is in, and of the one it left when it moved; `project://{id}` of a project created.

Two ways to subscribe: `resources/subscribe` in the handshake era, which belongs to a session
(stdio, stateful HTTP; a stateless server has no session to send to, so it serves none), and
`subscriptions/listen` in the 2026-07-28 era, whose response is the stream of the changes the
request named, served on every transport (the SDK's `ListenHandler`, fed through its bus).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.subscriptions import ListenHandler, ResourceUpdated, SubscriptionBus
from mcp.shared.exceptions import MCPError
from mcp.types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    EmptyResult,
    SubscribeRequestParams,
    SubscriptionsListenRequestParams,
    SubscriptionsListenResult,
    UnsubscribeRequestParams,
)
from sqlalchemy import Integer, bindparam, func, or_
from sqlmodel import col, select
from sqlmodel.sql.expression import Select

from mcp_server import scopes
from mcp_server.client_logs import connection_of
from mcp_server.db import INCLUDE_DELETED, Database, named_rows
from mcp_server.errors import DATABASE_ERRORS
from mcp_server.models import AuditAction, AuditEntry, AuditSeal, Entity, EntityKind
from mcp_server.resources import resource_id
from mcp_server.scopes import Scope
from mcp_server.sql import one_of

logger = logging.getLogger(__name__)

SUBSCRIBE = "resources/subscribe"
LISTEN = "subscriptions/listen"
UNSUBSCRIBE = "resources/unsubscribe"
MOST_PER_SESSION = 1000
_URI = re.compile(r"^(task|project)://([^/]*)(/tasks)?$")
_PROJECT_OF = select(Entity.project_id).where(
    col(Entity.id) == bindparam("task_id"), col(Entity.kind) == EntityKind.TASK.value
)
# The tool whose reading a subscription follows: an agent subscribes to what it may read.
_READ_AS = {
    ("task", False): "get_task",
    ("project", False): "list_projects",
    ("project", True): "search_tasks",
}

_HEAD = select(func.coalesce(func.max(AuditSeal.seq), 0))
_old_project = AuditEntry.old_value["project_id"].as_integer()  # type: ignore[index]
# What was sealed in (after, head] and touches a subscription: the entity, its kind, its project
# now, and the project it left (an update that moved it).
_TOUCHED: Select[*tuple[Any, ...]] = (
    Select(
        col(AuditEntry.entity_id),
        col(Entity.kind),
        col(Entity.project_id),
        _old_project.label("left"),
        col(AuditEntry.action),
    )
    .join(AuditSeal, col(AuditSeal.entry_id) == col(AuditEntry.id))
    .join(Entity, col(Entity.id) == col(AuditEntry.entity_id))
    .where(col(AuditSeal.seq) > bindparam("after", type_=Integer()))
    .where(col(AuditSeal.seq) <= bindparam("head", type_=Integer()))
    .where(
        or_(
            one_of(AuditEntry.entity_id, "entities"),
            one_of(Entity.project_id, "projects"),
            one_of(_old_project, "projects"),
        )
    )
)


def parse(uri: str) -> tuple[str, int, bool] | None:
    """(kind, id, its task list?) of a resource URI this server serves; None otherwise."""
    if (match := _URI.fullmatch(uri)) is None or (match.group(1) == "task" and match.group(3)):
        return None
    if (number := resource_id(match.group(2))) is None:
        return None
    return match.group(1), number, bool(match.group(3))


def touched(kind: str, entity_id: int, project_id: int | None, left: int | None, action: str) -> set[str]:
    """The resources one audit entry's change touches."""
    if kind == EntityKind.PROJECT.value:
        return {f"project://{entity_id}"} if action == AuditAction.CREATED.value else set()
    uris = {f"task://{entity_id}"}
    uris |= {f"project://{project}/tasks" for project in (project_id, left) if project is not None}
    return uris


@dataclass
class _Subscriber:
    session: ServerSession  # any of the connection's sessions reaches its standalone channel
    uris: set[str] = field(default_factory=set)


class Subscriptions:
    """The subscriptions of this process's clients, and the reading of the chain that serves them."""

    def __init__(
        self,
        may_read: Callable[[ServerRequestContext[Any, Any], str], bool],
        scope_of: Callable[[ServerRequestContext[Any, Any]], Scope],
        poll_seconds: float,
        bus: SubscriptionBus,
    ) -> None:
        self._may_read = may_read  # may the calling agent call this tool
        self._scope_of = scope_of  # the projects the calling agent may read (scopes.py)
        self._poll_seconds = poll_seconds
        self._subscribers: dict[int, _Subscriber] = {}  # by id() of the client's connection
        self._bus = bus
        self._listen = ListenHandler(bus)
        self._listening: dict[object, frozenset[str]] = {}  # the resources of each open listen stream
        self._db: Database | None = None
        self._after = 0  # the last seq read
        self._poller: asyncio.Task[None] | None = None

    def open(self, db: Database) -> None:
        self._db = db

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    async def subscribe(
        self, ctx: ServerRequestContext[Any, Any], params: SubscribeRequestParams
    ) -> EmptyResult:
        uri = str(params.uri)
        await self._check(ctx, uri)
        subscriber = self._subscribers.setdefault(id(connection_of(ctx)), _Subscriber(ctx.session))
        if uri not in subscriber.uris and len(subscriber.uris) >= MOST_PER_SESSION:
            raise MCPError(
                code=INVALID_REQUEST,
                message=f"a session holds at most {MOST_PER_SESSION} subscriptions; unsubscribe some first",
            )
        subscriber.uris.add(uri)
        await self._start()
        return EmptyResult()

    async def listen(
        self, ctx: ServerRequestContext[Any, Any], params: SubscriptionsListenRequestParams
    ) -> SubscriptionsListenResult:
        """A 2026-07-28 listen stream: its resources checked as a subscription's are, then served
        by the SDK until the client goes; the resources are read for while it lasts."""
        uris = frozenset(params.notifications.resource_subscriptions or ())
        for uri in uris:
            await self._check(ctx, uri)
        stream = object()
        if uris:
            self._listening[stream] = uris
            await self._start()
        try:
            return await self._listen(ctx, params)
        finally:
            self._listening.pop(stream, None)

    async def _check(self, ctx: ServerRequestContext[Any, Any], uri: str) -> None:
        """A resource this server serves, which the calling agent may read: as the tool that shows
        it, and within its projects (a task's, looked up; a scoped agent may not watch an id that
        names no task yet, which could become one outside its projects)."""
        if (named := parse(uri)) is None:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"cannot subscribe to {uri!r}: subscribe to task://42, project://7 or project://7/tasks",
            )
        tool = _READ_AS[(named[0], named[2])]
        if not self._may_read(ctx, tool):
            raise MCPError(
                code=INVALID_REQUEST,
                message=f"permission denied: {uri} shows what {tool} shows (tool:{tool} is missing)",
            )
        if (scope := self._scope_of(ctx)) is None:
            return
        kind, number, _ = named
        project_id = number if kind == EntityKind.PROJECT.value else await self._project_of(number)
        if project_id is None:
            raise MCPError(
                code=INVALID_PARAMS, message=f"cannot subscribe to {uri!r}: no task has id {number}"
            )
        if project_id not in scope:
            raise MCPError(
                code=INVALID_REQUEST,
                message=f"permission denied: {uri} is in project {project_id}, outside the projects you "
                f"may use (permission {scopes.permission(project_id)} is missing)",
            )

    async def _project_of(self, task_id: int) -> int | None:
        """The project of the task `task_id`, deleted or not; None when there is no such task."""
        assert self._db is not None, "opened by the server's lifespan"
        async with self._db.session(write=False) as session:
            found = await session.exec(
                _PROJECT_OF, params={"task_id": task_id}, execution_options=INCLUDE_DELETED
            )
            return found.first()

    async def unsubscribe(
        self, ctx: ServerRequestContext[Any, Any], params: UnsubscribeRequestParams
    ) -> EmptyResult:
        key = id(connection_of(ctx))
        if (subscriber := self._subscribers.get(key)) is not None:
            subscriber.uris.discard(str(params.uri))
            if not subscriber.uris:
                del self._subscribers[key]
        return EmptyResult()

    async def _start(self) -> None:
        if self._poller is None or self._poller.done():
            self._after = await self._head()  # from now on: what came before is no news
            self._poller = asyncio.create_task(self._poll(), name="mcp-task-server changes")

    async def _head(self) -> int:
        assert self._db is not None, "opened by the server's lifespan"
        async with self._db.session(write=False) as session:
            return int((await session.exec(_HEAD)).one())

    async def _poll(self) -> None:
        while self._subscribers or self._listening:
            await anyio.sleep(self._poll_seconds)
            try:
                await self.round()
            except DATABASE_ERRORS as exc:  # the next round tries again from the same place
                logger.warning("could not read changes for subscriptions: %s", type(exc).__name__)
            except Exception:  # a bug must not end every subscription of the process
                logger.exception("reading changes for subscriptions failed")

    async def round(self) -> int:
        """Read what was sealed since the last round and tell each subscriber what touched its
        resources; how many notifications were sent."""
        assert self._db is not None, "opened by the server's lifespan"
        listened = frozenset().union(*self._listening.values())
        wanted = listened.union(*(s.uris for s in self._subscribers.values()))
        entities = [parse(uri)[1] for uri in wanted if not uri.endswith("/tasks")]  # type: ignore[index]
        projects = [parse(uri)[1] for uri in wanted if uri.endswith("/tasks")]  # type: ignore[index]
        async with self._db.session(write=False) as session:
            head = int((await session.exec(_HEAD)).one())
            if head <= self._after:
                return 0
            params = {"after": self._after, "head": head, "entities": entities, "projects": projects}
            found = await session.exec(_TOUCHED, params=params, execution_options=INCLUDE_DELETED)
            rows = named_rows(found)
        self._after = head
        changed: set[str] = set()
        for row in rows:
            changed |= touched(row["kind"], row["entity_id"], row["project_id"], row["left"], row["action"])
        sent = 0
        for uri in sorted(listened & changed):  # the SDK's handler sends each to the streams that named it
            await self._bus.publish(ResourceUpdated(uri=uri))
            sent += 1
        for key, subscriber in list(self._subscribers.items()):
            for uri in sorted(subscriber.uris & changed):
                try:
                    await subscriber.session.send_resource_updated(uri)
                    sent += 1
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, MCPError):
                    self._subscribers.pop(key, None)  # the client is gone, and its subscriptions with it
                    break
        return sent
