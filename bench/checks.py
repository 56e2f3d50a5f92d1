"""What each multi-agent check costs a call, on the loaded database: the duplicate guard, a project
scope, a write budget. Each pair is the same call by two agents that differ only in that check,
one stdio server process per agent, called in turn (ABAB...), so both see the same database,
cache and load; each call is timed from its first byte sent to its answer's last byte read, and
each server's CPU time is read from /proc.

- duplicate guard: `create_task` with a new title each time, guarded, against the same with
  `allow_duplicate` (no lock, no probe), in the largest project; and the probe alone (EXPLAIN
  ANALYZE of the guard's NOT EXISTS on the index);
- project scope: a first page of `search_tasks` (pending, newest first) and `get_task` by an agent
  whose scope is ten projects, against an unscoped one;
- write budget: `update_task` (a priority toggle) by an agent with a budget it never reaches,
  against one without.

    python -m bench.checks --postgres URL [--calls 300] [--out DIR]

Every create and update writes to the database: run it on the benchmark's data, not on anything
that matters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from bench.stdio import StdioServer
from mcp_server import titles

logger = logging.getLogger("bench.checks")

Call = Callable[[StdioServer, int], Awaitable[float]]
GUARD_PROBE = """EXPLAIN (ANALYZE, FORMAT JSON)
SELECT NOT EXISTS (SELECT 1 FROM entity AS other WHERE other.project_id = $1 AND other.title_key = $2
    AND other.kind = 'task' AND other.deleted_at IS NULL)"""


async def start(url: str, logs: Path, name: str, agent: dict[str, Any]) -> StdioServer:
    config = logs / f"{name}.json"
    settings = {"database_url": url, "log_level": "WARNING", "agent_id": agent["id"], "agents": [agent]}
    config.write_text(json.dumps(settings | {"sealer": name == "plain"}))
    command = [sys.executable, "-m", "mcp_server", "--config", str(config)]
    return await StdioServer.start(name, command, {}, logs / f"{name}.log")


async def pair(calls: int, a: tuple[StdioServer, Call], b: tuple[StdioServer, Call]) -> dict[str, Any]:
    """`calls` calls of each, in turn; p50 and p95 of each in ms, and each server's CPU per call."""
    times: dict[str, list[float]] = {a[0].name: [], b[0].name: []}
    cpu = {server.name: server.cpu_seconds() for server, _ in (a, b)}
    for n in range(calls):
        for server, call in (a, b) if n % 2 == 0 else (b, a):
            times[server.name].append(await call(server, n))
    result: dict[str, Any] = {}
    for server, _ in (a, b):
        spent = (server.cpu_seconds() - cpu[server.name]) / calls
        measured = sorted(times[server.name])
        result[server.name] = {
            "p50 ms": round(statistics.median(measured) * 1000, 2),
            "p95 ms": round(measured[int(len(measured) * 0.95)] * 1000, 2),
            "server CPU ms/call": round(spent * 1000, 2),
        }
    names = list(result)
    result["difference p50 ms"] = round(result[names[0]]["p50 ms"] - result[names[1]]["p50 ms"], 2)
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(args.postgres)
    try:
        largest = await conn.fetchrow(
            "SELECT project_id, count(*) AS tasks FROM entity WHERE kind = 'task' AND deleted_at IS NULL "
            "GROUP BY project_id ORDER BY 2 DESC LIMIT 1"
        )
        project, project_tasks = largest["project_id"], largest["tasks"]
        scope = [
            row["id"]
            for row in await conn.fetch("SELECT id FROM entity WHERE kind = 'project' ORDER BY id LIMIT 10")
        ]
        in_scope = await conn.fetchval(
            "SELECT id FROM entity WHERE kind = 'task' AND deleted_at IS NULL AND project_id = $1 LIMIT 1",
            scope[0],
        )
        existing = await conn.fetchval(
            "SELECT title FROM entity WHERE kind = 'task' AND deleted_at IS NULL AND project_id = $1 LIMIT 1",
            project,
        )
        plan = json.loads(await conn.fetchval(GUARD_PROBE, project, titles.key(existing)))[0]
        probe = {"execution ms": plan["Execution Time"], "planning ms": plan["Planning Time"]}
        total = await conn.fetchval("SELECT count(*) FROM entity WHERE kind = 'task'")
    finally:
        await conn.close()
    logs = Path(tempfile.mkdtemp(prefix="bench-checks-"))
    agents = {
        "plain": {"id": "bench-plain"},
        "unguarded": {"id": "bench-unguarded"},
        "scoped": {"id": "bench-scoped", "projects": scope},
        "budgeted": {
            "id": "bench-budgeted",
            "write_budget": {"calls": 10**9, "rows": 10**12, "window_seconds": 60},
        },
    }
    servers = {name: await start(args.postgres, logs, name, agent) for name, agent in agents.items()}
    try:

        def create(allow_duplicate: bool) -> Call:
            async def call(server: StdioServer, n: int) -> float:
                title = f"bench check {uuid.uuid4().hex[:12]}"
                arguments = {"title": title, "project_id": project, "allow_duplicate": allow_duplicate}
                return (await server.call("create_task", arguments))[0]

            return call

        async def search(server: StdioServer, n: int) -> float:
            arguments = {"filter": {"field": "status", "op": "eq", "value": "pending"}, "limit": 50}
            return (await server.call("search_tasks", arguments))[0]

        async def get(server: StdioServer, n: int) -> float:
            return (await server.call("get_task", {"task_id": in_scope}))[0]

        async def update(server: StdioServer, n: int) -> float:
            priority = ("low", "high")[n % 2]
            return (await server.call("update_task", {"task_id": in_scope, "priority": priority}))[0]

        results = {
            "database": {"tasks": total, "largest project's live tasks": project_tasks},
            "duplicate guard: create_task": await pair(
                args.calls, (servers["plain"], create(False)), (servers["unguarded"], create(True))
            ),
            "duplicate guard: the index probe alone (EXPLAIN ANALYZE)": probe,
            "project scope of 10 projects: search_tasks, first page of 50": await pair(
                args.calls, (servers["scoped"], search), (servers["plain"], search)
            ),
            "project scope of 10 projects: get_task": await pair(
                args.calls, (servers["scoped"], get), (servers["plain"], get)
            ),
            "write budget: update_task": await pair(
                args.calls, (servers["budgeted"], update), (servers["plain"], update)
            ),
        }
    finally:
        for server in servers.values():
            await server.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", required=True)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    results = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checks.json").write_text(json.dumps(results, indent=2) + "\n")
    logger.info("%s", json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
