"""Who is calling: the identity every change is recorded under.

It comes from how the agent connected, never from a tool argument: the configured agent id
(`MCP_AGENT_ID` or `agent_id` in the config file) when there is one, otherwise the client name
that the MCP client reported when it connected.
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import Context

from mcp_server.config import Settings

UNKNOWN_CLIENT = "unknown-client"
MAX_LENGTH = 200


def agent_identity(ctx: Context[Any, Any], settings: Settings) -> str:
    if settings.agent_id:
        return settings.agent_id
    params = ctx.session.client_params
    name = params.client_info.name.strip() if params is not None else ""
    return name[:MAX_LENGTH] or UNKNOWN_CLIENT
