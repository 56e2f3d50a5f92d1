"""Floods against one HTTP server process, and whether a real agent is served meanwhile.

Each scenario runs on a fresh server process of each version: a new SQLite file, default settings
but for two static agents, "worker" and the read-only "flooder".

- connections: helper processes (15,000 connections at most each: the open-file limit is per
  process) open --connections idle TCP connections as fast as they can and, once all are open, hold
  them --seconds; then each is open (as the client sees it), closed by the server (EOF, reset, an
  HTTP answer), failed or never connected.
- sessions: a helper process POSTs the flooder's `initialize` to /mcp without a session id, 16 at a
  time, for --seconds or --sessions requests, never ending a session; answers counted by status.

Meanwhile, every second, the worker opens a new session with the SDK's client over streamable HTTP
and calls search_tasks once: ok and ms to the answer, or the error (10 s at most). Also measured:
the server's CPU seconds, peak RSS and open files (/proc), its log (lines, bytes, tracebacks by
type), the load average. Each --version-dir (e.g. `git archive REV | tar -x -C DIR`) goes first on
the server's PYTHONPATH. A table per scenario puts the versions side by side; JSON goes to --out.

    python -m bench.flood --version-dir /tmp/before --version-dir /tmp/after [--scenario sessions]
        [--connections 21000] [--seconds 30] [--sessions 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import multiprocessing
import os
import re
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.stdio import cpu_seconds
from bench.writers import _free_port, _listening
from mcp_server.auth import mint_token, token_sha256

ATTEMPT_SECONDS = 10
PER_PROCESS = 15_000
SENDERS = 16
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
CLIENT_INFO = {"name": "flood", "version": "1"}
PARAMS = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": CLIENT_INFO}
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": PARAMS}  # as tests/test_limits.py


async def attempt(url: str, token: str, since: float = 0) -> dict[str, Any]:
    """A new session and one search_tasks call in it: ok or the error, ms to the answer or failure."""
    started = time.perf_counter()
    at = round(time.monotonic() - since, 1) if since else None  # seconds into the flood
    try:
        async with (
            asyncio.timeout(ATTEMPT_SECONDS),
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
            Client(streamable_http_client(url, http_client=http)) as client,
        ):
            result = await client.call_tool("search_tasks", {})
            ms = round((time.perf_counter() - started) * 1000, 1)
    except Exception as exc:
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        ms = round((time.perf_counter() - started) * 1000, 1)
        return {"at": at, "ok": False, "error": f"{type(leaf).__name__}: {leaf}"[:120], "ms": ms}
    error = " ".join(getattr(part, "text", "") for part in result.content)[:120]
    return {"at": at, "ok": not result.is_error, "ms": ms} | ({"error": error} if result.is_error else {})


def hold_connections(port: int, count: int, seconds: float, all_open: Any) -> dict[str, Any]:
    """In a helper process: open `count` connections, hold them idle, say what became of each."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    fate: Counter[str] = Counter()
    held = []
    started = time.monotonic()
    for _ in range(count):
        try:
            sock = socket.socket()
            sock.setblocking(False)
            if (code := sock.connect_ex(("127.0.0.1", port))) not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
        except OSError as exc:
            fate[f"not opened: {errno.errorcode.get(exc.errno or 0, str(exc))}"] += 1
            continue
        held.append(sock)
    opened = time.monotonic() - started
    all_open.wait()  # the hold starts when every helper has opened its share
    time.sleep(seconds)
    for sock in held:
        fate[fate_of(sock)] += 1
        sock.close()
    return {"fate": fate, "opened in s": opened}


def fate_of(sock: socket.socket) -> str:
    if error := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
        return f"error: {errno.errorcode[error]}"
    try:
        data = sock.recv(64)
    except BlockingIOError:
        with contextlib.suppress(OSError):
            sock.getpeername()
            return "open, as the client sees it"
        return "never connected"
    except ConnectionResetError:
        return "closed: reset"
    if not data:
        return "closed: EOF"
    return f"closed: HTTP {data.split()[1].decode()}" if data.startswith(b"HTTP/") else "closed: other data"


async def in_helpers(target: Any, argument_lists: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """`target(*arguments)` in a process of its own for each argument list: off the worker's event loop,
    each with its own open-file limit."""
    with multiprocessing.get_context("spawn").Pool(len(argument_lists)) as pool:
        return await asyncio.to_thread(pool.starmap, target, argument_lists)


async def flood_connections(port: int, count: int, seconds: float) -> dict[str, Any]:
    n = -(-count // PER_PROCESS)
    shares = [count // n + (i < count % n) for i in range(n)]
    start_manager = multiprocessing.get_context("spawn").Manager
    with await asyncio.to_thread(start_manager) as manager:  # started off the worker's event loop
        all_open = manager.Barrier(n)
        parts = await in_helpers(hold_connections, [(port, share, seconds, all_open) for share in shares])
    return {
        "connections": count,
        "opened in s": round(max(part["opened in s"] for part in parts), 2),
        "their fate at the end": dict(sum((part["fate"] for part in parts), Counter()).most_common()),
    }


def open_sessions(url: str, token: str, seconds: float, most: int) -> dict[str, Any]:
    """In a helper process: open sessions as fast as SENDERS at a time can, count the answers."""
    answers: Counter[str] = Counter()
    sent, started = 0, time.monotonic()
    headers = MCP_HEADERS | {"Authorization": f"Bearer {token}"}

    async def send(raw: httpx2.AsyncClient) -> None:
        nonlocal sent
        while time.monotonic() - started < seconds and sent < most:
            sent += 1
            try:
                answer = await raw.post(url, headers=headers, json=INITIALIZE)
            except httpx2.HTTPError as exc:
                answers[type(exc).__name__] += 1
                continue
            limit = re.search(r"\((http_\w+)\)", answer.text) if answer.status_code != 200 else None
            answers[f"{answer.status_code} {limit.group(1) if limit else ''}".strip()] += 1

    async def flood() -> None:
        async with httpx2.AsyncClient(timeout=ATTEMPT_SECONDS) as raw:
            await asyncio.gather(*(send(raw) for _ in range(SENDERS)))

    asyncio.run(flood())
    return {
        "initialize requests": sent,
        "... a second": round(sent / (time.monotonic() - started), 1),
        "answers": dict(answers.most_common()),
        "sessions the flooder got": answers["200"],  # in stateful mode, a 200 is a session
    }


async def flood_sessions(url: str, token: str, seconds: float, most: int) -> dict[str, Any]:
    return (await in_helpers(open_sessions, [(url, token, seconds, most)]))[0]


def sample(pid: int) -> tuple[float, float, int]:
    """The process's CPU seconds so far, peak RSS in MB and open file descriptors, from /proc."""
    peak_kb = Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0]
    return cpu_seconds(pid), round(int(peak_kb) / 1024, 1), len(os.listdir(f"/proc/{pid}/fd"))


def log_figures(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    lines = data.decode(errors="replace").splitlines()
    kinds: Counter[str] = Counter()
    for n, line in enumerate(lines):
        indent, found, _ = line.partition("Traceback (most recent call last):")
        if found:  # its exception is the next line as indented as the header, at the same depth
            indent = indent.replace("+ Exception Group ", "| ")
            for later in lines[n + 1 : n + 500]:
                if later.startswith(indent) and later[len(indent) : len(indent) + 1] not in ("", " "):
                    kinds[later[len(indent) :].split(":")[0]] += 1
                    break
    return {"log lines": len(lines), "log bytes": len(data), "tracebacks": dict(kinds)}


async def run(scenario: str, version: Path | None, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One scenario against a fresh server process of `version`, first on its PYTHONPATH."""
    name = f"{scenario}-{version.name if version else 'installed'}"
    tokens = {"worker": mint_token(), "flooder": mint_token()}
    agents: list[dict[str, Any]] = [{"id": id, "token_sha256": token_sha256(t)} for id, t in tokens.items()]
    agents[1]["read_only"] = True
    config = folder / f"{name}.json"
    config.write_text(json.dumps({"database_url": f"sqlite:///{folder / name}.db", "agents": agents}))
    python_path = [str(version or ""), os.environ.get("PYTHONPATH", "")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, python_path))}
    port = _free_port()
    command = [sys.executable, "-m", "mcp_server", "--config", str(config), "serve"]
    command += ["--transport", "http", "--port", str(port)]
    with (folder / f"{name}.log").open("wb") as log:
        # Started in its own folder: `-m` puts the working directory first on the path, and from
        # the repository's that would be this checkout's mcp_server, whatever PYTHONPATH says.
        process = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=log, env=env, cwd=folder)
    try:
        await _listening(port)
        url = f"http://127.0.0.1:{port}/mcp"
        unflooded = [await attempt(url, tokens["worker"]) for _ in range(3)]  # the first one is cold
        assert all(a["ok"] for a in unflooded), unflooded
        results: dict[str, Any] = {"load average at start": round(os.getloadavg()[0], 2)}
        (cpu_start, peak, fds), since = sample(process.pid), time.monotonic()
        cpu = cpu_start
        if scenario == "connections":
            flood = asyncio.ensure_future(flood_connections(port, args.connections, args.seconds))
        else:
            flood = asyncio.ensure_future(flood_sessions(url, tokens["flooder"], args.seconds, args.sessions))
        attempts = []
        while True:
            with contextlib.suppress(OSError):  # read while the server lives
                cpu, peak, open_fds = sample(process.pid)
                fds = max(fds, open_fds)
            if flood.done():
                break
            attempts.append(asyncio.ensure_future(attempt(url, tokens["worker"], since)))
            await asyncio.wait({flood}, timeout=1)
        done = await asyncio.gather(*attempts)
        times = sorted(a["ms"] for a in done if a["ok"])
        results |= {
            "worker attempts ok / failed": f"{len(times)} / {len(done) - len(times)}",
            "worker ms p50 / max (ok)": times and f"{statistics.median(times):.0f} / {times[-1]:.0f}",
            "worker ms unflooded": round(unflooded[-1]["ms"]),
            "worker errors": dict(Counter(a["error"] for a in done if not a["ok"]).most_common(3)),
            "worker attempts": done,
            **flood.result(),
            "server CPU s": round(cpu - cpu_start, 1),
            "server peak RSS MB": peak,
            "server open fds, most seen": fds,
            "server exit code during the flood": process.returncode,
            "load average at end": round(os.getloadavg()[0], 2),
        }
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
    return results | log_figures(folder / f"{name}.log")


def table(columns: dict[str, dict[str, Any]]) -> str:
    rows = [row for row in dict.fromkeys(k for c in columns.values() for k in c) if row != "worker attempts"]
    width = max(map(len, rows))
    lines = [" " * width + " | " + " | ".join(f"{name:<40}" for name in columns)]
    for row in rows:
        lines.append(f"{row:<{width}} | " + " | ".join(f"{c.get(row, '')!s:<40}" for c in columns.values()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version-dir", type=Path, action="append", help="code to serve (repeat to compare)")
    parser.add_argument("--scenario", choices=["connections", "sessions"], action="append")
    parser.add_argument("--connections", type=int, default=21_000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--sessions", type=int, default=10_000, help="the most initialize requests")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "flood.json")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    sys.stderr.write(f"server configs, databases and logs: {folder}\n")
    report: dict[str, Any] = {}
    for scenario in args.scenario or ["connections", "sessions"]:
        report[scenario] = {}
        for version in args.version_dir or [None]:
            sys.stderr.write(f"{scenario} flood, {version or 'installed'}\n")
            report[scenario][str(version or "installed")] = asyncio.run(run(scenario, version, folder, args))
        sys.stdout.write(f"\n{scenario} flood\n{table(report[scenario])}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
