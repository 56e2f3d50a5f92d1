# ruff: noqa: E501  -- the page's HTML and CSS read better unwrapped
"""The consent page of the built-in authorization server (oauth.py): where an operator signs in
and decides whether an OAuth client may act as one of the configured agents.

Server-rendered, no script. The request it decides is named by an unguessable value in its URL and
form, so another site cannot make a browser decide one; a POST from another origin is refused all
the same, and the page may not be framed. Wrong sign-ins are counted per operator in the database
(oauth.py), and too many lock the operator out for a while; each check costs a scrypt hash.
"""

from __future__ import annotations

import html
import logging
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from mcp_server.config import Settings
from mcp_server.errors import DATABASE_ERRORS
from mcp_server.models import utcnow
from mcp_server.oauth import CONSENT_PATH, BuiltInAuthorization, Pending
from mcp_server.schemas import iso_time

logger = logging.getLogger(__name__)

HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
GONE = "This authorization request has expired or was already decided. Start again from your client."
MAX_FORM_FIELD = 2000

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 34rem; margin: 2rem auto; padding: 0 1rem; color: #1a1a1a; }}
label {{ display: block; margin-top: 1rem; font-weight: 600; }}
input[type=text], input[type=password], select {{ width: 100%; padding: .5rem; font: inherit; box-sizing: border-box; }}
.buttons {{ display: flex; gap: 1rem; margin-top: 1.5rem; }}
button {{ font: inherit; padding: .6rem 1.2rem; }}
.error {{ color: #a00000; border-left: 4px solid #a00000; padding-left: .75rem; }}
code {{ word-break: break-all; }}
</style></head>
<body><main>
<h1>{title}</h1>
{body}
</main></body></html>
"""


def routes(provider: BuiltInAuthorization, settings: Settings) -> list[tuple[str, Any, list[str]]]:
    """(path, endpoint, methods) for the consent page."""

    async def consent(request: Request) -> Response:
        try:
            return await _consent(request)
        except DATABASE_ERRORS:
            logger.exception("the consent page could not reach the database")
            busy = (
                "<p>The server is busy right now; nothing was decided. Go back and try again in a moment.</p>"
            )
            return _page("Try again", busy, 503, {"Retry-After": "5"})

    async def _consent(request: Request) -> Response:
        if request.method == "GET":
            value = request.query_params.get("request", "")
            pending = await provider.pending(value) if value else None
            if pending is None:
                return _page("Authorization request not found", f"<p>{GONE}</p>", 400)
            return _form(pending, value, settings)
        return await _decide(request, provider, settings)

    return [(CONSENT_PATH, consent, ["GET", "POST"])]


async def _decide(request: Request, provider: BuiltInAuthorization, settings: Settings) -> Response:
    origin = request.headers.get("origin")
    if origin is not None and origin != _origin(settings.issuer_url):
        return _page("Refused", "<p>This form can only be sent from this server's own page.</p>", 403)
    form = await request.form(max_files=0, max_fields=10)
    fields = {
        key: str(form.get(key, ""))[:MAX_FORM_FIELD]
        for key in ("request", "operator", "password", "agent", "decision")
    }
    value = fields["request"]
    pending = await provider.pending(value) if value else None
    if pending is None:
        return _page("Authorization request not found", f"<p>{GONE}</p>", 400)
    if fields["decision"] == "deny":
        return _back(await provider.decide(value, None, None, False))
    source = request.client.host if request.client is not None else "an unknown address"
    attempt = await provider.sign_in(fields["operator"], fields["password"], source)
    if attempt.locked_until is not None:
        wait = max(1, int((attempt.locked_until - utcnow()).total_seconds()))
        locked = (
            f"Too many failed sign-ins for this operator: try again after {iso_time(attempt.locked_until)}."
        )
        return _form(pending, value, settings, locked, 429, {"Retry-After": str(wait)})
    operator = attempt.operator
    if operator is None:
        return _form(pending, value, settings, "The operator id or password is wrong.", 401)
    if operator.read_only:
        return _form(
            pending,
            value,
            settings,
            f"Operator {operator.id} is read-only and cannot authorize clients.",
            403,
        )
    if settings.agent(fields["agent"]) is None:
        return _form(pending, value, settings, "Choose one of the listed agents.", 400)
    read_only = form.get("read_only") == "yes"
    return _back(await provider.decide(value, operator, fields["agent"], read_only))


def _back(url: str | None) -> Response:
    if url is None:
        return _page("Authorization request not found", f"<p>{GONE}</p>", 400)
    return RedirectResponse(url, status_code=303, headers=HEADERS)


def _form(
    pending: Pending,
    value: str,
    settings: Settings,
    error: str | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    e = html.escape
    name = e(pending.client_name or "An unnamed client")
    agents = "".join(
        f'<option value="{e(agent.id)}">{e(agent.id)}{" (read-only)" if agent.read_only else ""}</option>'
        for agent in settings.agents
    )
    scopes = (
        f"<p>It asks for the scopes <code>{e(' '.join(pending.scopes))}</code>.</p>" if pending.scopes else ""
    )
    problem = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    body = f"""{problem}
<p><strong>{name}</strong> (as it calls itself) asks to use this task server. After you decide, your
browser goes back to <code>{e(pending.redirect_uri)}</code>: allow it only if that is the client you
are setting up.</p>
{scopes}
<form method="post" action="{CONSENT_PATH}">
<input type="hidden" name="request" value="{e(value)}">
<label for="operator">Operator id</label>
<input type="text" id="operator" name="operator" autocomplete="username" required>
<label for="password">Password</label>
<input type="password" id="password" name="password" autocomplete="current-password" required>
<label for="agent">Act as agent (its changes are recorded under this identity)</label>
<select id="agent" name="agent">{agents}</select>
<label><input type="checkbox" name="read_only" value="yes"> Read only: it may search and read, not change</label>
<div class="buttons">
<button type="submit" name="decision" value="allow">Allow</button>
<button type="submit" name="decision" value="deny" formnovalidate>Deny</button>
</div>
</form>"""
    return _page("Authorize a client", body, status, headers)


def _page(title: str, body: str, status: int, headers: dict[str, str] | None = None) -> HTMLResponse:
    page = _PAGE.format(title=html.escape(title), body=body)
    return HTMLResponse(page, status_code=status, headers=HEADERS | (headers or {}))


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
