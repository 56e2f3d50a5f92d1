"""The console for people: served by the HTTP server under /console, to operators who sign in.

Server-rendered HTML (Jinja2 templates, autoescaped), no build step; htmx (vendored, 0BSD) makes
two small parts live: the board's filters apply as they change, and the count of changesets waiting
for approval refreshes. Every page works without script.

- The board: tasks with the same filters as search_tasks (tasks.search_tasks).
- A task: its fields, claim, dependencies and comments, and its audit history as diffs.
- Agents: each one's activity over the last day, recent refusals, budgets and policies.
- Changesets: those waiting for approval, each with its tasks' before and after; approve or reject
  (changesets.decide), bound to the digest on the page.
- A request: what one call changed, and its undo (reverts.revert_request) with a preview first.
- The audit chain: its head, the latest signed checkpoint, and a full verification on demand.

What an operator does here is recorded in the audit log as `operator:<id>`: signing in, approving,
rejecting, undoing. A read-only operator sees everything and changes nothing. Every change is a
POST carrying the sign-in's form token and, from a browser, this server's own Origin; pages may not
be framed, and a strict Content-Security-Policy allows this server's own script and style only.
Off unless `console` is configured (and operators with it).
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import TypeAdapter, ValidationError
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from mcp_server import audit, chain, changesets, comments, graph, operators, reverts, tasks
from mcp_server.checkpoints import CheckpointKeys
from mcp_server.config import Settings
from mcp_server.console import reads, sessions
from mcp_server.db import Database
from mcp_server.errors import DATABASE_ERRORS, NotFoundError, TaskServerError
from mcp_server.filters import AllOf, Condition, FilterField, Operator
from mcp_server.identity import UNRESTRICTED, Call, new_request_id
from mcp_server.models import AuditAction, Priority, TaskStatus, utcnow
from mcp_server.schemas import AuditTrail, OrderBy, iso_time

logger = logging.getLogger(__name__)

PATH = "/console"
PAGE_SIZE = 50
HISTORY_SIZE = 100
MAX_FORM_FIELD = 2000
STATIC = {"htmx.min.js": "text/javascript", "console.css": "text/css", "favicon.svg": "image/svg+xml"}
HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
_TASK_ID = TypeAdapter(int)
_HEX_ID = re.compile(r"[0-9a-f]{32}")  # a changeset's or a request's id


@dataclass(frozen=True)
class Page:
    """A signed-in request: who, and the form token their changes carry."""

    request: Request
    signed_in: sessions.SignedIn

    @property
    def operator_id(self) -> str:
        return operators.recorded_id(self.signed_in.operator)


Handler = Callable[[Page, AsyncSession], Awaitable[Response]]


class Console:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._sign_ins = operators.SignIns(settings)
        self._db: Database | None = None
        self._keys: CheckpointKeys | None = None
        self._cookie = sessions.cookie_name(settings)
        self._templates = Environment(
            loader=PackageLoader("mcp_server.console"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self._templates.globals.update(base=PATH, iso_time=iso_time)
        self._templates.filters["shown"] = _shown

    def open(self, db: Database, keys: CheckpointKeys) -> None:
        self._db, self._keys = db, keys

    @property
    def db(self) -> Database:
        assert self._db is not None, "the console is used before the server started"
        return self._db

    def routes(self) -> list[tuple[str, Any, list[str]]]:
        """(path, endpoint, methods) of every page."""
        return [
            (f"{PATH}/static/{{name}}", self._static, ["GET"]),
            (f"{PATH}/sign-in", self._sign_in, ["GET", "POST"]),
            (f"{PATH}/sign-out", self._signed(self._sign_out), ["POST"]),
            (PATH, self._signed(self._board), ["GET"]),
            (f"{PATH}/tasks/{{task_id}}", self._signed(self._task), ["GET"]),
            (f"{PATH}/agents", self._signed(self._agents), ["GET"]),
            (f"{PATH}/changesets", self._signed(self._changesets), ["GET"]),
            (f"{PATH}/changesets/waiting", self._signed(self._waiting), ["GET"]),
            (f"{PATH}/changesets/{{changeset_id}}", self._signed(self._changeset), ["GET"]),
            (f"{PATH}/changesets/{{changeset_id}}", self._signed(self._decide, change=True), ["POST"]),
            (f"{PATH}/requests/{{request_id}}", self._signed(self._request), ["GET"]),
            (f"{PATH}/requests/{{request_id}}", self._signed(self._undo, change=True), ["POST"]),
            (f"{PATH}/audit", self._signed(self._audit), ["GET"]),
        ]

    # --- around every page ----------------------------------------------------------------------

    def _signed(self, handler: Handler, *, change: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """`handler` for a signed-in operator, in one transaction; others are sent to sign in. A POST
        must carry the sign-in's form token and come from this server's own pages; one that changes
        something (`change`) is refused to a read-only operator."""

        async def endpoint(request: Request) -> Response:
            token = request.cookies.get(self._cookie)
            try:
                async with self.db.session(write=False) as session:
                    signed_in = await sessions.current(session, self._settings, token)
                if signed_in is None or token is None:
                    return self._to_sign_in(request)
                if signed_in.renew:
                    async with self.db.session(write=True) as session:
                        await sessions.renew(session, self._settings, token)
                page = Page(request, signed_in)
                if request.method == "POST" and (refused := await self._refuse_post(page, change=change)):
                    return refused
                async with self.db.session(write=request.method == "POST") as session:
                    return await handler(page, session)
            except NotFoundError as exc:
                return self._message(request, "Not found", str(exc), 404)
            except TaskServerError as exc:
                return self._message(request, "Refused", str(exc), 409)
            except DATABASE_ERRORS:
                logger.exception("a console page could not reach the database")
                return self._message(
                    request, "Try again", "The database is busy or restarting; nothing was changed.", 503
                )

        return endpoint

    async def _refuse_post(self, page: Page, *, change: bool) -> Response | None:
        """Why a POST is refused: not from this console's pages, without the sign-in's form token,
        or a change by a read-only operator; None when it may go on."""
        request = page.request
        if not _same_origin(request):
            return self._message(
                request, "Refused", "This form can only be sent from this console's pages.", 403
            )
        form = await request.form(max_files=0, max_fields=20)
        if not sessions.same(str(form.get("csrf", ""))[:MAX_FORM_FIELD], page.signed_in.csrf_token):
            return self._message(
                request, "Refused", "The form has expired: reload the page and try again.", 403
            )
        if change and page.signed_in.operator.read_only:
            operator = page.signed_in.operator.id
            return self._message(
                request, "Refused", f"Operator {operator} is read-only: it may look, not change.", 403
            )
        return None

    def _to_sign_in(self, request: Request) -> Response:
        if request.headers.get("hx-request"):  # an htmx fragment: have the whole page go there
            return Response(status_code=204, headers={"HX-Redirect": f"{PATH}/sign-in"})
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{PATH}/sign-in?{urlencode({'next': target})}", 303, headers=HEADERS)

    def _render(self, request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        page = self._templates.get_template(template).render(request=request, **values)
        return HTMLResponse(page, status_code=status, headers=HEADERS)

    def _message(self, request: Request, title: str, text: str, status: int) -> HTMLResponse:
        return self._render(request, "message.html", status, title=title, text=text, page=None)

    def _view(self, page: Page, template: str, **values: Any) -> HTMLResponse:
        return self._render(page.request, template, page=page, signed_in=page.signed_in, **values)

    async def _static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found", 404)
        body = (resources.files("mcp_server.console") / "static" / name).read_bytes()
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "public, max-age=3600"})

    # --- signing in and out ---------------------------------------------------------------------

    async def _sign_in(self, request: Request) -> Response:
        form_cookie = self._cookie + sessions.SIGN_IN_COOKIE_SUFFIX
        next_page = within_console(request.query_params.get("next", PATH))
        if request.method == "GET":
            return self._sign_in_form(request, next_page)
        if not _same_origin(request):
            return self._message(
                request, "Refused", "This form can only be sent from this console's pages.", 403
            )
        form = await request.form(max_files=0, max_fields=10)
        fields = {k: str(form.get(k, ""))[:MAX_FORM_FIELD] for k in ("operator", "password", "form_token")}
        expected = request.cookies.get(form_cookie, "")
        if not expected or not sessions.same(fields["form_token"], expected):
            return self._sign_in_form(request, next_page, "The form has expired: try again.", 403)
        source = request.client.host if request.client is not None else "an unknown address"
        try:
            attempt = await self._sign_ins.check(self.db, fields["operator"], fields["password"], source)
            if attempt.locked_until is not None:
                until = iso_time(attempt.locked_until)
                return self._sign_in_form(
                    request,
                    next_page,
                    f"Too many failed sign-ins for this operator: try again after {until}.",
                    429,
                )
            if attempt.operator is None:
                return self._sign_in_form(request, next_page, "The operator id or password is wrong.", 401)
            async with self.db.session(write=True) as session:
                token = await sessions.start(session, self._settings, attempt.operator)
                call = _operator_call(operators.recorded_id(attempt.operator), "console/sign-in")
                session.add(audit.entry(call, AuditAction.SIGNED_IN, utcnow(), None, None, {"from": source}))
        except DATABASE_ERRORS:
            logger.exception("the console's sign-in could not reach the database")
            return self._message(request, "Try again", "The database is busy or restarting; try again.", 503)
        response = RedirectResponse(next_page, 303, headers=HEADERS)
        self._set_cookie(response, token)
        response.delete_cookie(form_cookie, path="/", secure=self._settings.secure_cookies, httponly=True)
        return response

    def _sign_in_form(
        self, request: Request, next_page: str, error: str | None = None, status: int = 200
    ) -> Response:
        form_token = sessions.new_token()
        response = self._render(
            request,
            "sign_in.html",
            status,
            page=None,
            error=error,
            form_token=form_token,
            next_page=next_page,
        )
        response.set_cookie(
            self._cookie + sessions.SIGN_IN_COOKIE_SUFFIX,
            form_token,
            max_age=3600,
            path="/",
            secure=self._settings.secure_cookies,
            httponly=True,
            samesite="strict",
        )
        return response

    def _set_cookie(self, response: Response, token: str) -> None:
        assert self._settings.console is not None
        response.set_cookie(
            self._cookie,
            token,
            max_age=self._settings.console.session_minutes * 60,
            path="/",
            secure=self._settings.secure_cookies,
            httponly=True,
            samesite="strict",
        )

    async def _sign_out(self, page: Page, session: AsyncSession) -> Response:
        await sessions.end(session, page.request.cookies.get(self._cookie))
        call = _operator_call(page.operator_id, "console/sign-out")
        session.add(audit.entry(call, AuditAction.SIGNED_OUT, utcnow(), None, None, {}))
        response = RedirectResponse(f"{PATH}/sign-in", 303, headers=HEADERS)
        response.delete_cookie(self._cookie, path="/", secure=self._settings.secure_cookies, httponly=True)
        return response

    # --- the pages ------------------------------------------------------------------------------

    async def _board(self, page: Page, session: AsyncSession) -> Response:
        query = page.request.query_params
        chosen = {
            key: query.get(key, "").strip()[:200]
            for key in ("status", "priority", "project", "q", "claimed_by")
        }
        include_deleted = query.get("deleted") == "yes"
        conditions = _board_filter(chosen)
        found = await tasks.search_tasks(
            session,
            filter=AllOf(**{"and": conditions})
            if len(conditions) > 1
            else (conditions[0] if conditions else None),
            order_by=[OrderBy(field="updated_at", direction="desc")],
            limit=PAGE_SIZE,
            page_token=query.get("after") or None,
            include_deleted=include_deleted,
            include_total=True,
            scope=None,
        )
        kept = {key: value for key, value in chosen.items() if value} | (
            {"deleted": "yes"} if include_deleted else {}
        )
        return self._view(
            page,
            "board.html",
            found=found,
            chosen=chosen,
            include_deleted=include_deleted,
            statuses=[s.value for s in TaskStatus],
            priorities=[p.value for p in Priority],
            projects=await reads.projects(session),
            next_query=urlencode(kept | {"after": found.get("next_page_token", "")}),
        )

    async def _task(self, page: Page, session: AsyncSession) -> Response:
        task_id = _id(page.request.path_params["task_id"], "task")
        task = await tasks.find(session, task_id, scope=None)
        shown = tasks.public(task)
        history = await _trail(session, entity_id=task_id)
        said = None
        if task.deleted_at is None:
            said = await comments.list_comments(session, task_id, after=None, limit=50, scope=None)
        return self._view(
            page,
            "task.html",
            task=shown,
            blockers=await graph.blockers(session, task_id, unfinished_only=False),
            history=history,
            comments=said,
        )

    async def _agents(self, page: Page, session: AsyncSession) -> Response:
        now = utcnow()
        return self._view(
            page,
            "agents.html",
            activity=await reads.activity(session, now),
            refusals=await reads.recent_refusals(session),
            budgets=await reads.budgets_used(session),
            agents=self._settings.agents,
        )

    async def _changesets(self, page: Page, session: AsyncSession) -> Response:
        now = utcnow()
        return self._view(
            page,
            "changesets.html",
            pending=await reads.pending_changesets(session, now),
            decided=await reads.decided_changesets(session, now),
            state_of=changesets.state_of,
        )

    async def _waiting(self, page: Page, session: AsyncSession) -> Response:
        count = await reads.pending_count(session, utcnow())
        return self._render(page.request, "waiting.html", count=count)

    async def _changeset(self, page: Page, session: AsyncSession, notice: str | None = None) -> Response:
        changeset_id = _hex(page.request.path_params["changeset_id"], "changeset")
        shown = await changesets.get_changeset(session, changeset_id, created_by=None, limit=500)
        return self._view(page, "changeset.html", changeset=shown, notice=notice)

    async def _decide(self, page: Page, session: AsyncSession) -> Response:
        changeset_id = _hex(page.request.path_params["changeset_id"], "changeset")
        form = await page.request.form(max_files=0, max_fields=20)
        decision = form.get("decision")
        if decision not in ("approve", "reject"):
            return self._message(page.request, "Refused", "Choose approve or reject.", 400)
        digest = str(form.get("digest", ""))[:64]
        decided = await changesets.decide(
            session, page.operator_id, changeset_id, digest, approve=decision == "approve"
        )
        if decided.applied_request_id is not None:
            return RedirectResponse(
                f"{PATH}/requests/{decided.applied_request_id}?approved=1", 303, headers=HEADERS
            )
        return RedirectResponse(f"{PATH}/changesets/{changeset_id}", 303, headers=HEADERS)

    async def _request(self, page: Page, session: AsyncSession) -> Response:
        request_id = _hex(page.request.path_params["request_id"], "request")
        entries = await _trail(session, request_id=request_id)
        if not entries["items"]:
            raise NotFoundError(f"no change was recorded under request {request_id}")
        preview = await reverts.revert_request(
            session, _operator_call(page.operator_id, "console/undo"), request_id, atomic=False, dry_run=True
        )
        return self._view(
            page,
            "request.html",
            request_id=request_id,
            entries=entries,
            preview=preview,
            approved=page.request.query_params.get("approved") == "1",
        )

    async def _undo(self, page: Page, session: AsyncSession) -> Response:
        request_id = _hex(page.request.path_params["request_id"], "request")
        call = _operator_call(page.operator_id, "console/undo")
        undone = await reverts.revert_request(session, call, request_id, atomic=False)
        if not undone["reverted"]:
            why = "; ".join(f"task {left['task_id']}: {left['reason']}" for left in undone["left"][:20])
            return self._message(page.request, "Nothing to undo", f"Nothing was put back. {why}", 409)
        return RedirectResponse(f"{PATH}/requests/{call.request_id}", 303, headers=HEADERS)

    async def _audit(self, page: Page, session: AsyncSession) -> Response:
        assert self._keys is not None
        report = await chain.verify(session, self._keys) if page.request.query_params.get("verify") else None
        return self._view(page, "audit.html", chain=await reads.chain_head(session), report=report)


async def _trail(
    session: AsyncSession, *, entity_id: int | None = None, request_id: str | None = None
) -> AuditTrail:
    """The newest entries of a task's history, or of one request, as get_audit_trail shows them."""
    return await audit.get_audit_trail(
        session,
        entity_id=entity_id,
        request_id=request_id,
        changed_by=None,
        action=None,
        since=None,
        until=None,
        limit=HISTORY_SIZE,
        page_token=None,
        scope=None,
    )


def _operator_call(operator_id: str, tool: str) -> Call:
    """What an operator does in the console, as a call: recorded under `operator:<id>`."""
    return Call(tool=tool, agent_id=operator_id, permissions=UNRESTRICTED, request_id=new_request_id())


def _hex(text: str, what: str) -> str:
    """A changeset's or request's id from a path, as the server makes them; anything else is none."""
    if _HEX_ID.fullmatch(text) is None:
        raise NotFoundError(f"there is no {what} {text[:40]!r}")
    return text


def _id(text: str, what: str) -> int:
    try:
        value = _TASK_ID.validate_strings(text)
    except ValidationError:
        raise NotFoundError(f"there is no {what} {text[:40]!r}") from None
    if not 1 <= value < 2**63:
        raise NotFoundError(f"there is no {what} {value}")
    return value


def _board_filter(chosen: dict[str, str]) -> list[Condition]:
    """The board's choices as search_tasks conditions; a value that is not one of the choices is
    ignored (the form offers only those)."""
    conditions = []
    if chosen["status"] in {s.value for s in TaskStatus}:
        conditions.append(Condition(field=FilterField.STATUS, op=Operator.EQ, value=chosen["status"]))
    if chosen["priority"] in {p.value for p in Priority}:
        conditions.append(Condition(field=FilterField.PRIORITY, op=Operator.EQ, value=chosen["priority"]))
    if chosen["project"].isdigit() and 0 < int(chosen["project"]) < 2**63:
        conditions.append(
            Condition(field=FilterField.PROJECT_ID, op=Operator.EQ, value=int(chosen["project"]))
        )
    if chosen["q"]:
        conditions.append(Condition(field=FilterField.TITLE, op=Operator.CONTAINS, value=chosen["q"]))
    if chosen["claimed_by"]:
        conditions.append(Condition(field=FilterField.CLAIMED_BY, op=Operator.EQ, value=chosen["claimed_by"]))
    return conditions


def within_console(path: str) -> str:
    """Where to go after signing in: a page of the console, never anywhere else."""
    path_only, _, query = path.partition("?")
    if "\\" in path or posixpath.normpath(path_only) != path_only.rstrip("/") or "%" in path_only:
        return PATH
    if path_only != PATH and not path_only.startswith(PATH + "/"):
        return PATH
    return path_only + (f"?{query}" if query else "")


def _same_origin(request: Request) -> bool:
    """A browser's POST names the page's origin; it must be this server's as the browser reached it."""
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


def _shown(value: Any) -> str:
    """A value of an audit entry as a person reads it."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
