"""A minimal MCP client over stdio, the same for every server measured.

It writes one JSON-RPC line and reads lines until the matching response, and times exactly
that: from the request's first byte written to the response's last byte read. Parsing the
response, like schema validation or model building, is the client's work and would differ by
what each server returns (a structured result costs this client's json.loads about twice the
time of a text one), so it happens after the clock stops. It also knows the server's pid, for
its memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = "2025-11-25"  # what Node-based desktop hosts negotiate


class ToolCallError(RuntimeError):
    pass


class StdioServer:
    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self._next_id = 0
        self.server_info: dict[str, Any] = {}
        self.last_response = b""  # the last response's line, as it arrived

    @classmethod
    async def start(
        cls, name: str, command: Sequence[str], env: Mapping[str, str], stderr_path: Path
    ) -> StdioServer:
        stderr = stderr_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, **env},
            limit=64 * 1024 * 1024,
        )
        stderr.close()
        server = cls(name, process)
        result = await server.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        )
        server.server_info = result.get("serverInfo", {})
        await server._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return server

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        await self.process.stdin.drain()

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        return (await self._timed_request(method, params))[1]

    async def _timed_request(self, method: str, params: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Seconds from the request's first byte written to its response's last byte read, and the
        response's result."""
        self._next_id += 1
        request_id = self._next_id
        started = time.perf_counter()
        await self._send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        assert self.process.stdout is not None
        while True:
            line = await self.process.stdout.readline()
            received = time.perf_counter()
            if not line:
                raise ToolCallError(f"{self.name} closed its stdout (exit {await self.process.wait()})")
            message = json.loads(line)
            if message.get("id") != request_id or "method" in message:
                continue  # a notification, or a request of the server's own (none expected)
            self.last_response = line
            if "error" in message:
                raise ToolCallError(f"{self.name}: {message['error']}")
            result: dict[str, Any] = message["result"]
            return received - started, result

    async def call(self, tool: str, arguments: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Seconds for one tools/call, and its result; a tool error raises."""
        elapsed, result = await self._timed_request("tools/call", {"name": tool, "arguments": arguments})
        if result.get("isError"):
            text = " ".join(c.get("text", "") for c in result.get("content", []))
            raise ToolCallError(f"{self.name} {tool}: {text}")
        return elapsed, result

    async def tools(self) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = (await self.request("tools/list", {}))["tools"]
        return tools

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far (user and system), from /proc."""
        return cpu_seconds(self.pid)

    def memory_kb(self) -> tuple[int, int]:
        """(current RSS, peak RSS) in KiB, from /proc."""
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
        return fields["VmRSS"], fields["VmHWM"]

    async def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def cpu_seconds(pid: int) -> float:
    """Process `pid`'s CPU time so far (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
