"""Measure the server against raw asyncpg and the peer servers, on one loaded database.

Every contestant runs the same operation on the same data in the same run: our tool over stdio
(sequential calls on a warm session), the same SQL by hand in asyncpg (the floor), and for
reads the same SQL through `@modelcontextprotocol/server-postgres` and `@bytebase/dbhub` over
stdio. Calls alternate between contestants in blocks, so a noisy moment on the machine lands on
all of them. Results go to a JSON file and a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import mcp.types as mcp_types
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for

from bench.stdio import StdioServer
from mcp_server.schemas import COUNT_CAP

logger = logging.getLogger("bench.measure")

HERE = Path(__file__).resolve().parent
PAGE = 50
HOT_TASK_OFFSET = 1  # the hot task is the first task: id = projects + 1
BULK_PROJECTS = 100  # projects 1..100 hold 100,000 tasks at full size

TASK_COLUMNS = (
    "t.id, t.title, t.description, t.status, t.priority, t.project_id, p.title AS project_name, "
    "t.created_at, t.updated_at, t.deleted_at, t.version"
)
TRAIL_COLUMNS = "id, entity_id, action, changed_by, client_name, changed_at, request_id, old_value, new_value"


@dataclass(frozen=True)
class Shape:
    name: str
    filter: dict[str, Any]
    where: str  # the same condition in SQL, over `t`
    deep: bool = True  # also measure a deep page (see --deep-page)
    tuned: bool = True  # measured (and its indexes chosen) before issue 12; the others were not


def shapes(project: int) -> list[Shape]:
    other_project = project * 2 // 3 + 7  # another project than the one the tuned shape reads
    return [
        Shape(
            "indexed and",
            {
                "and": [
                    {"field": "status", "op": "eq", "value": "in_progress"},
                    {"field": "priority", "op": "in", "value": ["high", "critical"]},
                ]
            },
            "t.status = 'in_progress' AND t.priority IN (3, 4)",
        ),
        Shape(
            "or",
            {
                "or": [
                    {"field": "status", "op": "eq", "value": "blocked"},
                    {"field": "priority", "op": "eq", "value": "critical"},
                ]
            },
            "(t.status = 'blocked' OR t.priority = 4)",
        ),
        Shape(
            "contains in a project",
            {
                "and": [
                    {"field": "project_id", "op": "eq", "value": project},
                    {"field": "title", "op": "contains", "value": "deploy"},
                ]
            },
            f"t.project_id = {project} AND lower(t.title) LIKE '%deploy%'",
            deep=False,
        ),
        # Shapes the server was not tuned for before issue 12.
        Shape(
            "equal on two fields (5% match)",
            {
                "and": [
                    {"field": "status", "op": "eq", "value": "blocked"},
                    {"field": "priority", "op": "eq", "value": "medium"},
                ]
            },
            "t.status = 'blocked' AND t.priority = 2",
            tuned=False,
        ),
        Shape(
            "or across two fields",
            {
                "or": [
                    {"field": "status", "op": "eq", "value": "cancelled"},
                    {"field": "project_id", "op": "eq", "value": other_project},
                ]
            },
            f"(t.status = 'cancelled' OR t.project_id = {other_project})",
            tuned=False,
        ),
        Shape(
            "contains in another project",
            {
                "and": [
                    {"field": "project_id", "op": "eq", "value": other_project},
                    {"field": "title", "op": "contains", "value": "backup"},
                ]
            },
            f"t.project_id = {other_project} AND lower(t.title) LIKE '%backup%'",
            deep=False,
            tuned=False,
        ),
    ]


def search_sql(where: str, after: tuple[str, int] | None = None) -> str:
    keyset = "" if after is None else f" AND (t.created_at, t.id) < ('{after[0]}'::timestamptz, {after[1]})"
    return (
        f"SELECT {TASK_COLUMNS} FROM entity t JOIN entity p ON p.id = t.project_id "
        f"WHERE t.kind = 'task' AND t.deleted_at IS NULL AND {where}{keyset} "
        f"ORDER BY t.created_at DESC, t.id DESC LIMIT {PAGE + 1}"
    )


def count_sql(where: str) -> str:
    """How many tasks match, counted no further than the server counts (COUNT_CAP)."""
    return (
        f"SELECT count(*) FROM (SELECT t.id FROM entity t WHERE t.kind = 'task' AND t.deleted_at IS NULL "
        f"AND {where} LIMIT {COUNT_CAP + 1}) AS matching"
    )


def trail_sql(entity_id: int) -> str:
    return (
        f"SELECT {TRAIL_COLUMNS} FROM audit_entry WHERE entity_id = {entity_id} "
        f"ORDER BY changed_at DESC, id DESC LIMIT {PAGE + 1}"
    )


CREATE_SQL = """
WITH p AS (SELECT id, title FROM entity WHERE id = $2 AND kind = 'project' AND deleted_at IS NULL),
t AS (
    INSERT INTO entity (kind, title, description, status, priority, project_id, created_at, updated_at, version)
    SELECT 'task', $1, '', 'pending', 2, p.id, $3, $3, 1 FROM p RETURNING *
),
a AS (
    INSERT INTO audit_entry (entity_id, entity_type, action, changed_by, changed_at, request_id, new_value)
    SELECT id, 'task', 'created', 'bench-raw', created_at, $4, jsonb_build_object(
        'title', title, 'description', description, 'status', status, 'priority', 'medium',
        'project_id', project_id) FROM t
)
SELECT t.*, p.title AS project_name FROM t JOIN p ON p.id = t.project_id
"""

DELETE_SQL = """
WITH t AS (
    UPDATE entity SET deleted_at = $2, updated_at = $2, version = version + 1
    WHERE id = $1 AND kind = 'task' AND deleted_at IS NULL RETURNING *
),
a AS (
    INSERT INTO audit_entry (entity_id, entity_type, action, changed_by, changed_at, request_id, old_value, new_value)
    SELECT id, 'task', 'deleted', 'bench-raw', $2, $3, '{"deleted_at": null}',
        jsonb_build_object('deleted_at', $2::timestamptz) FROM t
)
SELECT t.*, p.title AS project_name FROM t JOIN entity p ON p.id = t.project_id
"""

BULK_SQL = """
WITH old AS (
    SELECT id, status FROM entity
    WHERE kind = 'task' AND project_id = ANY($2::int[]) AND deleted_at IS NULL AND status <> $1
    FOR UPDATE
),
changed AS (
    UPDATE entity e SET status = $1, updated_at = $3, version = e.version + 1
    FROM old WHERE e.id = old.id RETURNING e.id, old.status AS old_status
)
INSERT INTO audit_entry (entity_id, entity_type, action, changed_by, changed_at, request_id, old_value, new_value)
SELECT id, 'task', 'updated', 'bench-raw', $3, $4, jsonb_build_object('status', old_status),
    jsonb_build_object('status', $1::text) FROM changed
"""


@dataclass
class Series:
    """One contestant's timings of one operation, in seconds."""

    seconds: list[float] = field(default_factory=list)
    rows: int = 0
    cpu_seconds: float = 0.0  # the server process's CPU time over the timed calls (servers only)

    def summary(self) -> dict[str, Any]:
        ms = sorted(s * 1000 for s in self.seconds)
        out: dict[str, Any] = {"calls": len(ms), "p50_ms": round(statistics.median(ms), 3)}
        if len(ms) >= 20:
            out["p95_ms"] = round(ms[max(0, int(len(ms) * 0.95) - 1)], 3)
        if self.rows:
            out["rows"] = self.rows
            out["rows_per_s"] = round(self.rows / sum(self.seconds))
        if self.cpu_seconds:
            out["server_cpu_ms_per_call"] = round(self.cpu_seconds * 1000 / len(ms), 3)
        return out


Results = dict[str, dict[str, Series]]  # operation -> contestant -> series
Wire = dict[str, dict[str, dict[str, float]]]  # operation -> contestant -> bytes, client_parse_ms


def client_parse_ms(line: bytes, output_schema: dict[str, Any] | None, repeat: int = 200) -> float:
    """What the official Python client spends taking in one tools/call response: the JSON-RPC frame,
    the result model, and (where the tool declares an output schema) the structured content checked
    against it with a compiled validator, as mcp.ClientSession does. Median of `repeat`, in ms."""
    validator = None
    if output_schema is not None:
        validator = validator_for(output_schema)(output_schema)
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        message = mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False)
        result = mcp_types.CallToolResult.model_validate(message.result, by_name=False)  # type: ignore[union-attr]
        if validator is not None:
            best_match(validator.iter_errors(result.structured_content))
        timings.append(time.perf_counter() - started)
    return round(statistics.median(timings) * 1000, 3)


class Bench:
    def __init__(
        self, url: str, calls: int, block: int, deep_page: int, untuned_deep_page: int, out: Path
    ) -> None:
        self.deep_page = deep_page
        self.untuned_deep_page = untuned_deep_page
        self.url = url
        self.calls = calls
        self.block = block
        self.out = out
        self.results: Results = {}
        self.wire: Wire = {}
        self.output_schemas: dict[str, dict[str, Any] | None] = {}
        self.servers: dict[str, StdioServer] = {}
        self.ours: StdioServer
        self.raw: asyncpg.Connection
        self.rss_samples: list[int] = []

    def series(self, operation: str, contestant: str) -> Series:
        return self.results.setdefault(operation, {}).setdefault(contestant, Series())

    async def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        peers = HERE / "node_modules"
        self.ours = await StdioServer.start(
            "ours",
            [sys.executable, "-m", "mcp_server", "serve"],
            {"DATABASE_URL": self.url, "MCP_AGENT_ID": "bench-agent", "LOG_LEVEL": "WARNING"},
            self.out / "ours.stderr.log",
        )
        self.servers["ours"] = self.ours
        self.servers["server-postgres"] = await StdioServer.start(
            "server-postgres",
            ["node", str(peers / "@modelcontextprotocol/server-postgres/dist/index.js"), self.url],
            {},
            self.out / "server-postgres.stderr.log",
        )
        self.servers["dbhub"] = await StdioServer.start(
            "dbhub",
            ["node", str(peers / "@bytebase/dbhub/dist/index.js"), "--transport", "stdio", "--dsn",
             f"{self.url}?sslmode=disable"],
            {},
            self.out / "dbhub.stderr.log",
        )  # fmt: skip
        self.raw = await asyncpg.connect(self.url)
        self.output_schemas = {tool["name"]: tool.get("outputSchema") for tool in await self.ours.tools()}

    async def close(self) -> None:
        await self.raw.close()
        for server in self.servers.values():
            await server.close()

    def sample_memory(self) -> None:
        self.rss_samples.append(self.ours.memory_kb()[0])

    async def peer_sql(self, name: str, sql: str) -> float:
        tool = "query" if name == "server-postgres" else "execute_sql"
        elapsed, _ = await self.servers[name].call(tool, {"sql": sql})
        return elapsed

    async def raw_fetch(self, sql: str, *args: Any) -> float:
        started = time.perf_counter()
        await self.raw.fetch(sql, *args)
        return time.perf_counter() - started

    async def alternate(self, operation: str, runners: dict[str, Callable[[], Awaitable[float]]]) -> None:
        """Warm every contestant, then run them in turn, a block of calls each, until each made `calls`.
        The last warm-up response of each server is kept: its size, and what the official client
        spends taking it in (client_parse_ms)."""
        for name, run in runners.items():
            for _ in range(5):
                await run()
            if name in self.servers:
                line = self.servers[name].last_response
                schema = self.output_schemas.get(operation_tool(operation)) if name == "ours" else None
                self.wire.setdefault(operation, {})[name] = {
                    "bytes": len(line),
                    "client_parse_ms": client_parse_ms(line, schema),
                }
        done = 0
        while done < self.calls:
            n = min(self.block, self.calls - done)
            for name, run in runners.items():
                series = self.series(operation, name)
                server = self.servers.get(name)
                cpu_before = server.cpu_seconds() if server is not None else 0.0
                for _ in range(n):
                    series.seconds.append(await run())
                if server is not None:
                    series.cpu_seconds += server.cpu_seconds() - cpu_before
            done += n
        self.sample_memory()

    # --- reads -------------------------------------------------------------------------------

    async def searches(self, project: int) -> None:
        for shape in shapes(project):
            first = await self.our_search(shape, None)
            ids = [item["id"] for item in first["items"]]
            raw_ids = [row["id"] for row in await self.raw.fetch(search_sql(shape.where))][:PAGE]
            if ids != raw_ids:
                raise SystemExit(
                    f"{shape.name}: the tool and the SQL disagree on page 1; the SQL is not equivalent"
                )
            await self.alternate(f"search: {shape.name}, page 1", self.search_runners(shape, None, None))
            if shape.name == "or":
                await self.total(shape)
            if not shape.deep:
                continue
            page_no = self.deep_page if shape.tuned else self.untuned_deep_page
            token, after = await self.walk_to(shape, page_no)
            deep = await self.our_search(shape, token)
            raw_ids = [row["id"] for row in await self.raw.fetch(search_sql(shape.where, after))][:PAGE]
            if [item["id"] for item in deep["items"]] != raw_ids:
                raise SystemExit(f"{shape.name}: the tool and the SQL disagree on page {page_no}")
            await self.alternate(
                f"search: {shape.name}, page {page_no}", self.search_runners(shape, token, after)
            )

    async def total(self, shape: Shape) -> None:
        """The first page with include_total, against the page and the bounded count by hand."""
        args = {"filter": shape.filter, "limit": PAGE, "include_total": True}
        _, result = await self.ours.call("search_tasks", args)
        counted = await self.raw.fetchval(count_sql(shape.where))
        if result["structuredContent"]["total"] != min(counted, COUNT_CAP):
            raise SystemExit(f"{shape.name}: include_total and its SQL disagree")
        page_sql, total_sql = search_sql(shape.where), count_sql(shape.where)

        async def ours() -> float:
            return (await self.ours.call("search_tasks", args))[0]

        async def raw() -> float:
            started = time.perf_counter()
            await self.raw.fetch(page_sql)
            await self.raw.fetchval(total_sql)
            return time.perf_counter() - started

        await self.alternate(
            f"search: {shape.name}, page 1 with include_total", {"ours": ours, "raw asyncpg": raw}
        )

    async def our_search(self, shape: Shape, token: str | None) -> dict[str, Any]:
        args: dict[str, Any] = {"filter": shape.filter, "limit": PAGE}
        if token is not None:
            args["page_token"] = token
        _, result = await self.ours.call("search_tasks", args)
        page: dict[str, Any] = result["structuredContent"]
        return page

    async def walk_to(self, shape: Shape, page_no: int) -> tuple[str, tuple[str, int]]:
        """The token of page `page_no`, got by following next_page_token, and its keyset values."""
        token = None
        last: dict[str, Any] = {}
        for _ in range(page_no - 1):
            page = await self.our_search(shape, token)
            token = page.get("next_page_token")
            last = page["items"][-1]
            if token is None:
                raise SystemExit(f"{shape.name} has fewer than {page_no} pages; is the data loaded?")
        assert token is not None
        return token, (last["created_at"], last["id"])

    def search_runners(
        self, shape: Shape, token: str | None, after: tuple[str, int] | None
    ) -> dict[str, Callable[[], Awaitable[float]]]:
        args: dict[str, Any] = {"filter": shape.filter, "limit": PAGE}
        if token is not None:
            args["page_token"] = token
        sql = search_sql(shape.where, after)

        async def ours() -> float:
            return (await self.ours.call("search_tasks", args))[0]

        return {
            "ours": ours,
            "raw asyncpg": lambda: self.raw_fetch(sql),
            "server-postgres": lambda: self.peer_sql("server-postgres", sql),
            "dbhub": lambda: self.peer_sql("dbhub", sql),
        }

    async def audit_trail(self, task_id: int) -> None:
        sql = trail_sql(task_id)
        _, result = await self.ours.call("get_audit_trail", {"entity_id": task_id, "limit": PAGE})
        ids = [item["id"] for item in result["structuredContent"]["items"]]
        if ids != [row["id"] for row in await self.raw.fetch(sql)][:PAGE]:
            raise SystemExit("get_audit_trail and its SQL disagree")
        count = await self.raw.fetchval("SELECT count(*) FROM audit_entry WHERE entity_id = $1", task_id)
        total = await self.raw.fetchval("SELECT count(*) FROM audit_entry")
        logger.info("audit trail of task %d: %d of %d entries", task_id, count, total)

        async def ours() -> float:
            return (await self.ours.call("get_audit_trail", {"entity_id": task_id, "limit": PAGE}))[0]

        await self.alternate(
            "get_audit_trail (task with 1,000 entries), page 1",
            {
                "ours": ours,
                "raw asyncpg": lambda: self.raw_fetch(sql),
                "server-postgres": lambda: self.peer_sql("server-postgres", sql),
                "dbhub": lambda: self.peer_sql("dbhub", sql),
            },
        )

    # --- writes ------------------------------------------------------------------------------

    async def create_and_delete(self, project: int) -> None:
        ours_ids: list[int] = []
        raw_ids: list[int] = []

        async def ours_create() -> float:
            elapsed, result = await self.ours.call(
                "create_task", {"title": f"bench task {uuid.uuid4().hex[:8]}", "project_id": project}
            )
            ours_ids.append(result["structuredContent"]["id"])
            return elapsed

        async def raw_create() -> float:
            started = time.perf_counter()
            row = await self.raw.fetchrow(
                CREATE_SQL, f"bench task {uuid.uuid4().hex[:8]}", project, datetime.now(UTC), uuid.uuid4().hex
            )
            elapsed = time.perf_counter() - started
            raw_ids.append(row["id"])
            return elapsed

        await self.alternate("create_task", {"ours": ours_create, "raw asyncpg": raw_create})

        async def ours_delete() -> float:
            return (await self.ours.call("soft_delete_task", {"task_id": ours_ids.pop()}))[0]

        async def raw_delete() -> float:
            started = time.perf_counter()
            row = await self.raw.fetchrow(DELETE_SQL, raw_ids.pop(), datetime.now(UTC), uuid.uuid4().hex)
            elapsed = time.perf_counter() - started
            assert row is not None, "the raw delete found no live task"
            return elapsed

        await self.alternate("soft_delete_task", {"ours": ours_delete, "raw asyncpg": raw_delete})

    async def bulk(self, projects: list[int], rounds: int) -> None:
        """Flip the status of every live task in `projects` back and forth; each flip changes all of them."""
        statuses = ["cancelled", "pending"]
        filter = {"field": "project_id", "op": "in", "value": projects}
        operation = f"bulk_update_status ({len(projects)} projects)"

        async def ours(status: str) -> tuple[float, int]:
            elapsed, result = await self.ours.call("bulk_update_status", {"status": status, "filter": filter})
            return elapsed, int(result["structuredContent"]["changed_count"])

        async def raw(status: str) -> tuple[float, int]:
            started = time.perf_counter()
            async with self.raw.transaction():
                outcome = await self.raw.execute(
                    BULK_SQL, status, projects, datetime.now(UTC), uuid.uuid4().hex
                )
            return time.perf_counter() - started, int(outcome.split()[-1])

        await ours(statuses[0])  # from the loaded mix to all one status: not timed
        current = statuses[0]
        for _ in range(rounds):
            for name, run in (("ours", ours), ("raw asyncpg", raw)):
                current = statuses[1 - statuses.index(current)]  # every timed run changes every task
                elapsed, changed = await run(current)
                series = self.series(operation, name)
                series.seconds.append(elapsed)
                series.rows += changed
                logger.info("%s: %d tasks in %.2f s", name, changed, elapsed)
            self.sample_memory()


def operation_tool(operation: str) -> str:
    """The tool an operation's name starts with ('search: ...' is search_tasks)."""
    return "search_tasks" if operation.startswith("search:") else operation.split()[0]


def machine() -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])

    def version(*command: str) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "not found"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "node": version("node", "--version"),
    }


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the targets are stated in."""
    out: dict[str, Any] = {}
    ops = results["operations"]
    for op, by in ops.items():
        ours = by.get("ours")
        if ours is None:
            continue
        entry: dict[str, Any] = {}
        if "raw asyncpg" in by and "rows_per_s" in ours:
            entry["ours_rows_per_s_over_raw"] = round(ours["rows_per_s"] / by["raw asyncpg"]["rows_per_s"], 3)
        elif "raw asyncpg" in by:
            entry["ours_minus_raw_p50_ms"] = round(ours["p50_ms"] - by["raw asyncpg"]["p50_ms"], 3)
            entry["ours_over_raw_p50"] = round(ours["p50_ms"] / by["raw asyncpg"]["p50_ms"], 2)
        peers = [by[name]["p50_ms"] for name in ("server-postgres", "dbhub") if name in by]
        if peers:
            entry["ours_over_faster_peer_p50"] = round(ours["p50_ms"] / min(peers), 3)
        out[op] = entry
    for op in ops:
        deep = re.search(r", page (\d+)$", op)
        if op.startswith("search:") and deep and deep.group(1) != "1":
            first = op.rsplit(",", 1)[0] + ", page 1"
            out[op]["deep_over_first_page_p50"] = round(
                ops[op]["ours"]["p50_ms"] / ops[first]["ours"]["p50_ms"], 3
            )
    return out


async def fresh_copy(url: str) -> str:
    """A copy of the loaded database to measure on, so every run starts from the same data
    (the run's own writes, 100,000-task bulk updates among them, land in the copy)."""
    base, name = url.rsplit("/", 1)
    copy = f"{name}_run"
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{copy}" WITH (FORCE)')
        started = time.perf_counter()
        await admin.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{name}"')
        logger.info("copied %s to %s in %.1f s", name, copy, time.perf_counter() - started)
    finally:
        await admin.close()
    return f"{base}/{copy}"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = await fresh_copy(args.postgres)
    bench = Bench(url, args.calls, args.block, args.deep_page, args.untuned_deep_page, args.out)
    await bench.start()
    started = time.perf_counter()
    try:
        raw = bench.raw
        projects = await raw.fetchval("SELECT count(*) FROM entity WHERE kind = 'project'")
        tasks = await raw.fetchval("SELECT count(*) FROM entity WHERE kind = 'task'")
        entries = await raw.fetchval("SELECT count(*) FROM audit_entry")
        logger.info("data: %d projects, %d tasks, %d audit entries", projects, tasks, entries)
        await bench.searches(project=projects // 2)
        await bench.audit_trail(projects + HOT_TASK_OFFSET)
        await bench.create_and_delete(project=projects // 2)
        await bench.bulk(list(range(1, min(BULK_PROJECTS, projects) + 1)), args.bulk_rounds)
        rss_kb, peak_kb = bench.ours.memory_kb()
        versions = {name: server.server_info.get("version") for name, server in bench.servers.items()}
        pg_version = await raw.fetchval("SHOW server_version")
    finally:
        await bench.close()
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "postgresql": pg_version},
        "servers": versions,
        "data": {"projects": projects, "tasks": tasks, "audit_entries": entries},
        "seconds": round(time.perf_counter() - started, 1),
        "operations": {
            op: {name: series.summary() | bench.wire.get(op, {}).get(name, {}) for name, series in by.items()}
            for op, by in bench.results.items()
        },
        "server_memory_mb": {
            "peak_rss": round(peak_kb / 1024, 1),
            "rss_at_end": round(rss_kb / 1024, 1),
            "largest_sample": round(max(bench.rss_samples) / 1024, 1),
        },
    }
    results["ratios"] = ratios(results)
    return results


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    d = results["data"]
    lines = [
        f"Measured {results['when']} on {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"PostgreSQL {m['postgresql']}, Python {m['python']}, Node {m['node']}; "
        f"{d['tasks']:,} tasks in {d['projects']:,} projects, {d['audit_entries']:,} audit entries. "
        "p50 / p95 in ms per call over stdio (raw asyncpg: per query, no protocol).",
        "",
        "| operation | ours | raw asyncpg | server-postgres | dbhub | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for op, by in results["operations"].items():
        cells = []
        for name in ("ours", "raw asyncpg", "server-postgres", "dbhub"):
            s = by.get(name)
            if s is None:
                cells.append("–")
            elif "rows_per_s" in s:
                cells.append(f"{s['rows_per_s']:,} rows/s")
            else:
                cells.append(f"{s['p50_ms']:.2f} / {s.get('p95_ms', 0):.2f}")
        r = results["ratios"].get(op, {})
        notes = []
        if "ours_over_faster_peer_p50" in r:
            notes.append(f"{r['ours_over_faster_peer_p50']:.2f}× faster peer")
        if "deep_over_first_page_p50" in r:
            notes.append(f"{r['deep_over_first_page_p50']:.2f}× page 1")
        if "ours_minus_raw_p50_ms" in r and "ours_over_faster_peer_p50" not in r:
            notes.append(f"raw + {r['ours_minus_raw_p50_ms']:.2f} ms")
        if "ours_rows_per_s_over_raw" in r:
            notes.append(f"{r['ours_rows_per_s_over_raw']:.2f}× raw")
        lines.append(f"| {op} | {' | '.join(cells)} | {', '.join(notes)} |")
    lines += _server_table(
        results,
        "One response of each server (its last warm-up call): bytes on the wire, and the median time "
        "the official Python client (mcp.ClientSession's steps) takes to parse and check it, in ms.",
        "bytes",
        lambda s: f"{s['bytes']:,} B, {s['client_parse_ms']:.2f} ms",
    )
    lines += _server_table(
        results,
        "The server process's CPU time per call over the timed calls (user and system, from /proc), in ms.",
        "server_cpu_ms_per_call",
        lambda s: f"{s['server_cpu_ms_per_call']:.2f}",
    )
    mem = results["server_memory_mb"]
    lines += ["", f"Server peak RSS over the run: {mem['peak_rss']} MB."]
    return "\n".join(lines) + "\n"


def _server_table(
    results: dict[str, Any], caption: str, key: str, cell: Callable[[dict[str, Any]], str]
) -> list[str]:
    """A table of one figure (`key`, shown by `cell`) of each server, for the operations ours has it for."""
    names = ("ours", "server-postgres", "dbhub")
    lines = ["", caption, "", f"| operation | {' | '.join(names)} |", "|---|---|---|---|"]
    for op, by in results["operations"].items():
        if key in by.get("ours", {}):
            cells = [cell(by[name]) if key in by.get(name, {}) else "–" for name in names]
            lines.append(f"| {op} | {' | '.join(cells)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgres", required=True, metavar="URL", help="the database bench.generate loaded (left unchanged)"
    )
    parser.add_argument("--calls", type=int, default=200, help="timed calls per operation and contestant")
    parser.add_argument("--block", type=int, default=50, help="calls in a row before the next contestant")
    parser.add_argument("--bulk-rounds", type=int, default=3)
    parser.add_argument(
        "--deep-page", type=int, default=1000, help="the page number measured as the deep page"
    )
    parser.add_argument(
        "--untuned-deep-page",
        type=int,
        default=250,
        help="the deep page measured for the shapes the server was not tuned for before",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    results = asyncio.run(run(args))
    (args.out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "latest.md").write_text(table)
    sys.stderr.write(table)


if __name__ == "__main__":
    main()
