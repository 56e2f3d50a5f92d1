"""What tools/list shows: to each agent, only the tools it may call.

A read-only agent is shown no writing tool, and an agent limited to some tools is shown only those,
so an agent plans with what it can do instead of learning it from refusals. Hiding a tool grants
nothing and refuses nothing: a call of a hidden tool is refused, and recorded, as before
(server._guarded). The list comes in one page, so a cursor, which only a page of ours could have
given, is refused as invalid rather than ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS, ListToolsResult

from mcp_server.config import Permissions

LIST_TOOLS = "tools/list"
NO_CURSOR = "cursor is not valid here: tools/list returns every tool in one page; send no cursor"


def may_call(permissions: Permissions, tool: str, writes: bool) -> bool:
    """Whether an agent with `permissions` may call `tool` (one that `writes` or not)."""
    if permissions.tools is not None and tool not in permissions.tools:
        return False
    return not (writes and permissions.read_only)


class ToolsTheyMayCall(ServerMiddleware[Any]):
    """tools/list, left to the SDK, then cut down to the tools the calling agent may call."""

    def __init__(
        self, permissions: Callable[[ServerRequestContext[Any, Any]], Permissions], writing: frozenset[str]
    ) -> None:
        self._permissions = permissions  # the verified agent's, of the message in the context
        self._writing = writing  # the tools that change data

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method != LIST_TOOLS or ctx.request_id is None:
            return await call_next(ctx)
        if isinstance(ctx.params, dict) and ctx.params.get("cursor") is not None:
            raise MCPError(code=INVALID_PARAMS, message=NO_CURSOR)
        result = await call_next(ctx)
        permissions = self._permissions(ctx)
        if isinstance(result, ListToolsResult):
            result.tools = [tool for tool in result.tools if self._shown(permissions, tool.name)]
        elif isinstance(result, dict) and isinstance(result.get("tools"), list):  # as it goes on the wire
            shown = [tool for tool in result["tools"] if self._shown(permissions, tool["name"])]
            result = {**result, "tools": shown}
        return result

    def _shown(self, permissions: Permissions, tool: str) -> bool:
        return may_call(permissions, tool, tool in self._writing)
