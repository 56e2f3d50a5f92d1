"""Streamable HTTP: the SDK's app, behind what browsers and stateless deployments need, served by
uvicorn on uvloop.

- DNS-rebinding protection checks `Host` and `Origin` (the SDK's): the configured names, or on
  loopback any port of 127.0.0.1, localhost and ::1.
- CORS for browser-based clients: the origins the protection admits may call from a browser. A
  preflight is answered before authentication (it carries no token), and the headers a client
  must read, `Mcp-Session-Id` and `WWW-Authenticate` among them, are exposed.
- Off the MCP endpoint, bodies are small (the OAuth endpoints' forms), and the access log keeps
  no query strings.
- Stateless, there is no session whose stream a GET could open or a DELETE could end: both get
  405 with the methods that work, instead of an empty stream.
- Limits: what one agent may take (limits.py, inside authentication) and what any client may hold
  (connections.py, uvicorn's protocol itself).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Sequence
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import RequestBodyLimitMiddleware, TransportSecuritySettings
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_server import connections
from mcp_server.config import LOOPBACK_HOSTS, Settings
from mcp_server.limits import AgentLimits

MCP_PATH = "/mcp"
STATELESS = "this server is stateless: send every request as a POST; it has no session stream to open or end"
LOOPBACK_ALLOWED_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*")
LOOPBACK_ORIGINS = ("http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*")
# What a browser-based MCP client sends and must be allowed to read (MCP's streamable HTTP).
REQUEST_HEADERS = (
    "Authorization",
    "Content-Type",
    "Accept",
    "Mcp-Session-Id",
    "Mcp-Protocol-Version",
    "Last-Event-ID",
)
EXPOSED_HEADERS = ("Mcp-Session-Id", "Mcp-Protocol-Version", "WWW-Authenticate")
PREFLIGHT_MAX_AGE = 600
OFF_MCP_MAX_BODY = 65_536
# uvloop where it is installed (everywhere but Windows): the HTTP stack's loop work, as on stdio.
EVENT_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def security(settings: Settings) -> TransportSecuritySettings:
    loopback = settings.http_host in LOOPBACK_HOSTS
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=list(settings.allowed_hosts or (LOOPBACK_ALLOWED_HOSTS if loopback else ())),
        allowed_origins=list(settings.allowed_origins or (LOOPBACK_ORIGINS if loopback else ())),
    )


def app(server: MCPServer[Any], settings: Settings) -> ASGIApp:
    guard = security(settings)
    sdk_app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=settings.http_stateless,
        max_request_body_size=settings.http_max_body_bytes,
        session_idle_timeout=settings.http_session_idle_seconds,
        max_sessions=settings.http_max_sessions,
        transport_security=guard,
        host=settings.http_host,
    )
    # Last of the app's middleware, so inside authentication: it sees the agent a token proves.
    sdk_app.user_middleware.append(Middleware(AgentLimits, settings=settings, path=MCP_PATH))
    served: ASGIApp = sdk_app
    served = SmallBodiesOffMcp(served)
    if settings.http_stateless:
        served = NoSessionStreams(served)
    if guard.allowed_origins:
        served = CORSMiddleware(
            served,
            allow_origin_regex=origin_pattern(guard.allowed_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=list(REQUEST_HEADERS),
            expose_headers=list(EXPOSED_HEADERS),
            max_age=PREFLIGHT_MAX_AGE,
        )
    return served


def origin_pattern(origins: Sequence[str]) -> str:
    """One regular expression for origins as the transport security writes them (`*` for any port)."""
    return "|".join(re.escape(origin).replace(r"\*", "[0-9]+") for origin in origins)


class SmallBodiesOffMcp:
    """Everything but the MCP endpoint (which has its own limit, http_max_body_bytes) takes small
    bodies only: the OAuth endpoints' forms and registrations, the consent page's form."""

    def __init__(self, inner: ASGIApp) -> None:
        self.inner = inner
        self.limited = RequestBodyLimitMiddleware(inner, OFF_MCP_MAX_BODY)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/") != MCP_PATH:
            await self.limited(scope, receive, send)
            return
        await self.inner(scope, receive, send)


class NoSessionStreams:
    """Stateless: a GET or DELETE of the MCP endpoint has no session to stream or end."""

    def __init__(self, inner: ASGIApp) -> None:
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in ("GET", "DELETE")
            and scope["path"].rstrip("/") == MCP_PATH
        ):
            response = PlainTextResponse(
                STATELESS,
                status_code=405,
                headers={"Allow": "POST"},
            )
            await response(scope, receive, send)
            return
        await self.inner(scope, receive, send)


def serve(server: MCPServer[Any], settings: Settings) -> bool:
    """Serve until stopped; whether the app started (a failed start is logged by uvicorn)."""
    cap, backlog = connections.plan(settings.http_max_connections)
    config = uvicorn.Config(
        app(server, settings),
        host=settings.http_host,
        port=settings.http_port,
        loop=EVENT_LOOP,
        http=connections.limited_protocol(
            cap, settings.http_header_timeout_seconds, settings.http_body_timeout_seconds
        ),
        ws="none",
        backlog=backlog,
        timeout_keep_alive=settings.http_keep_alive_seconds,
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's records, its access log too, go through ours: to stderr
    )
    logging.getLogger("uvicorn.access").addFilter(without_query)
    runner = uvicorn.Server(config)
    runner.run()
    return runner.started


def without_query(record: logging.LogRecord) -> bool:
    """uvicorn's access log without query strings: they can carry values that must not be kept
    (a consent request's id; a token a careless client put in the URL)."""
    args = record.args
    if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
        record.args = (args[0], args[1], args[2].split("?", 1)[0] + "?…", args[3], args[4])
    return True
