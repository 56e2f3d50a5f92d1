"""What a read-only agent's `verify_audit_log` calls cost the writers, on the loaded database: one
agent changes a task call after call (`update_task`, a priority toggle) while another calls
`verify_audit_log` back to back, each on a stdio server process of its own.

- alone: the writer with no one verifying;
- whole walk every call: the verifier's server with no limits (`verify_interval_seconds` 0,
  `verify_full_interval_seconds` 0), as every call walked the whole chain before issue 17;
- as configured by default: at most once per agent every 10 s, and walking on from where the
  last verification ended (the whole chain on the process's first call, made and timed before
  the phase).

A walk still running when a phase ends is cut off with its server process.

For each: the writer's p50 and p95 in ms, and the verifier's calls: how many, how many refused,
and how long the walks took.

    python -m bench.verify --postgres URL [--seconds 30] [--out DIR]

The writer writes: run it on the benchmark's data, not on anything that matters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.stdio import StdioServer, ToolCallError

logger = logging.getLogger("bench.verify")


async def start(url: str, logs: Path, name: str, **settings: Any) -> StdioServer:
    config = logs / f"{name}.json"
    agent = {"id": f"bench-{name}", **({"read_only": True} if name != "writer" else {})}
    base = {"database_url": url, "log_level": "WARNING", "agent_id": agent["id"], "agents": [agent]}
    config.write_text(json.dumps(base | {"sealer": name == "writer"} | settings))
    command = [sys.executable, "-m", "mcp_server", "--config", str(config)]
    return await StdioServer.start(name, command, {}, logs / f"{name}.log")


async def phase(
    writer: StdioServer, task: int, seconds: float, verifier: StdioServer | None
) -> dict[str, Any]:
    writes: list[float] = []
    walks: list[float] = []
    refused = 0
    deadline = time.perf_counter() + seconds

    async def write() -> None:
        while time.perf_counter() < deadline:
            priority = ("low", "high")[len(writes) % 2]
            writes.append(
                (await writer.call("update_task", {"task_id": task, "priority": priority}))[0] * 1000
            )

    async def verify() -> None:
        nonlocal refused
        while verifier is not None and time.perf_counter() < deadline:
            try:
                walks.append((await verifier.call("verify_audit_log", {}))[0] * 1000)
            except ToolCallError:  # too soon: refused, saying when to retry
                refused += 1

    verifying = asyncio.ensure_future(verify())
    await write()
    verifying.cancel()  # a walk still running is cut off: its server process is closed next
    with contextlib.suppress(asyncio.CancelledError):
        await verifying
    ms = sorted(writes)
    result: dict[str, Any] = {
        "writes": len(ms),
        "write p50 ms": round(statistics.median(ms), 1),
        "write p95 ms": round(ms[int(len(ms) * 0.95)], 1),
    }
    if verifier is not None:
        result |= {"verifications": len(walks), "refused": refused, "walks ms": [round(w) for w in walks[:5]]}
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(args.postgres)
    try:
        task = await conn.fetchval("SELECT id FROM entity WHERE kind = 'task' AND deleted_at IS NULL LIMIT 1")
        entries = await conn.fetchval("SELECT count(*) FROM audit_entry")
    finally:
        await conn.close()
    logs = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    writer = await start(args.postgres, logs, "writer")
    results: dict[str, Any] = {"audit entries": entries}
    try:
        await writer.call("get_task", {"task_id": task})  # connected and warm
        results["alone"] = await phase(writer, task, args.seconds, None)
        for name, settings in (
            ("whole walk every call", {"verify_interval_seconds": 0, "verify_full_interval_seconds": 0}),
            ("as configured by default", {}),
        ):
            verifier = await start(args.postgres, logs, name.replace(" ", "-"), **settings)
            try:
                if not settings:  # a process's first verification walks the whole chain
                    first = (await verifier.call("verify_audit_log", {}))[0] * 1000
                    results["the first verification of a process (the whole chain) ms"] = round(first)
                results[name] = await phase(writer, task, args.seconds, verifier)
            finally:
                await verifier.close()
    finally:
        await writer.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", required=True, help="the loaded benchmark database")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long each phase lasts")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    results = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "verify.json").write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
