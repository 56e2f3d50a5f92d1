"""Command line: serve over stdio, or act as a scripted MCP client of this server.

`tools` and `call` start the server as a stdio subprocess and talk to it through the real
protocol, so they show exactly what an agent would see.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp.types import Implementation, TextContent

from mcp_server import __version__
from mcp_server.config import ConfigError, load_settings
from mcp_server.errors import StartupError
from mcp_server.server import create_server

logger = logging.getLogger("mcp_server")
T = TypeVar("T")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"mcp-task-server: {exc}\n")
        return 2
    # stdout carries the protocol on stdio: logs go to stderr only.
    logging.basicConfig(
        level=settings.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    command = args.command or "serve"
    if command == "serve":
        try:
            create_server(settings).run("stdio")
        except ExceptionGroup as group:
            if (startup := group.subgroup(StartupError)) is None:
                raise
            for problem in _leaves(startup):
                logger.error("%s", problem)
            return 1
        return 0
    server = _server_parameters(args.config)
    if command == "tools":
        return anyio.run(_list_tools, server)
    try:
        arguments = json.loads(args.arguments)
    except ValueError as exc:
        sys.stderr.write(f"mcp-task-server: the arguments are not valid JSON: {exc}\n")
        return 2
    if not isinstance(arguments, dict):
        sys.stderr.write("mcp-task-server: the arguments must be a JSON object\n")
        return 2
    return anyio.run(_call_tool, server, args.tool, arguments)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-task-server", description="MCP server for an audited task database (stdio by default)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", type=Path, help="JSON settings file; environment variables override it")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve MCP over stdio (the default)")
    commands.add_parser("tools", help="start the server and list its tools")
    call = commands.add_parser("call", help="start the server, call one tool, print its structured result")
    call.add_argument("tool", help="tool name, e.g. search_tasks")
    call.add_argument("arguments", nargs="?", default="{}", help="tool arguments as a JSON object")
    return parser


def _server_parameters(config: Path | None) -> StdioServerParameters:
    args = ["-m", "mcp_server"]
    if config is not None:
        args += ["--config", str(config.resolve())]
    return StdioServerParameters(command=sys.executable, args=[*args, "serve"], env=dict(os.environ))


def _client(server: StdioServerParameters) -> Client:
    return Client(server, client_info=Implementation(name="mcp-task-server-cli", version=__version__))


async def _ask(server: StdioServerParameters, request: Callable[[Client], Awaitable[T]]) -> T | None:
    """The answer to one request, or None (said on stderr) when the server died before answering."""
    try:
        async with _client(server) as client:
            return await request(client)
    except ExceptionGroup as group:
        if group.subgroup(MCPError) is None:
            raise
        sys.stderr.write("mcp-task-server: the server stopped before answering; its log above says why\n")
        return None


async def _list_tools(server: StdioServerParameters) -> int:
    result = await _ask(server, lambda client: client.list_tools())
    if result is None:
        return 1
    for tool in result.tools:
        summary = (tool.description or "").strip().splitlines()[0] if tool.description else ""
        _write(f"{tool.name}: {summary}")
    return 0


async def _call_tool(server: StdioServerParameters, tool: str, arguments: dict[str, Any]) -> int:
    result = await _ask(server, lambda client: client.call_tool(tool, arguments))
    if result is None:
        return 1
    if result.is_error:
        text = " ".join(block.text for block in result.content if isinstance(block, TextContent))
        sys.stderr.write(f"{text}\n")
        return 1
    _write(json.dumps(result.structured_content, indent=2, ensure_ascii=False))
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


def _write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
