"""Who is calling, and what they may do: the identity every change is recorded under.

It comes from how the agent connected, never from a tool argument. Over HTTP it is the agent a
verified bearer token proves (see auth.py). On stdio it is the configured agent id
(`MCP_AGENT_ID` or `agent_id`), or else the operating-system user who started the server; its
permissions come from the `agents` entry with that id, and are unrestricted without one. The
client's self-reported name is kept beside the identity as context, never as the identity.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import Context

from mcp_server.auth import AgentToken
from mcp_server.config import Permissions, Settings

MAX_LENGTH = 200
UNRESTRICTED = Permissions()


@dataclass(frozen=True)
class Principal:
    agent_id: str
    client_name: str | None
    permissions: Permissions


def principal(ctx: Context[Any, Any], settings: Settings) -> Principal:
    params = ctx.session.client_params
    client_name = params.client_info.name.strip()[:MAX_LENGTH] or None if params is not None else None
    token = get_access_token()
    if isinstance(token, AgentToken):
        return Principal(token.client_id, client_name, token.permissions)
    agent_id = settings.agent_id or local_user()
    agent = settings.agent(agent_id)
    return Principal(agent_id, client_name, agent if agent is not None else UNRESTRICTED)


def local_user() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"local:{user}"[:MAX_LENGTH]
