"""Writers side by side: a bulk status change and concurrent creators, each done three ways on one
PostgreSQL database in one run, and the sealer's delay.

- plain raw SQL: asyncpg on a plain task table and a plain audit table (no triggers, no chain);
- raw SQL on our tables: the same statements on `entity` and `audit_entry`, with their triggers;
- our server: the tools over stdio, one server process per concurrent agent (stateless servers
  on one database, as it scales out), each agent sending its next call when the last returns.

The plain tables are copies of the loaded tasks, with the same indexes, made by this script.
Afterwards it reads each sealed entry's delay (sealed_at - changed_at) from the database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.stdio import StdioServer

logger = logging.getLogger("bench.writers")

PLAIN_SCHEMA = [
    "DROP TABLE IF EXISTS plain_audit, plain_task",
    """CREATE TABLE plain_task AS SELECT id, title, description, status, priority, project_id, created_at,
        updated_at, deleted_at, version FROM entity WHERE kind = 'task'""",
    "ALTER TABLE plain_task ADD PRIMARY KEY (id)",
    "CREATE SEQUENCE plain_task_id_seq OWNED BY plain_task.id",
    "SELECT setval('plain_task_id_seq', (SELECT max(id) FROM plain_task))",
    "ALTER TABLE plain_task ALTER id SET DEFAULT nextval('plain_task_id_seq')",
    "CREATE INDEX ON plain_task (project_id, created_at, id)",
    "CREATE INDEX ON plain_task (status, created_at, id)",
    "CREATE INDEX ON plain_task (created_at)",
    """CREATE TABLE plain_audit (id bigserial PRIMARY KEY, entity_id bigint, entity_type varchar(16),
        action varchar(16) NOT NULL, changed_by varchar(200) NOT NULL, client_name varchar(200),
        changed_at timestamptz NOT NULL, request_id varchar(64) NOT NULL, old_value jsonb, new_value jsonb)""",
    "CREATE INDEX ON plain_audit (entity_id, changed_at, id)",
    "CREATE INDEX ON plain_audit (changed_by, changed_at)",
    "CREATE INDEX ON plain_audit (request_id)",
    "CREATE INDEX ON plain_audit (changed_at, id)",
    "VACUUM ANALYZE plain_task",
]
DROP_PLAIN = "DROP TABLE IF EXISTS plain_audit, plain_task"


def bulk_sql(task: str, audit: str, kind_filter: str) -> str:
    return f"""
WITH old AS (
    SELECT id, status FROM {task}
    WHERE {kind_filter} project_id = ANY($2::int[]) AND deleted_at IS NULL AND status <> $1
    FOR UPDATE
),
changed AS (
    UPDATE {task} e SET status = $1, updated_at = $3, version = e.version + 1
    FROM old WHERE e.id = old.id RETURNING e.id, old.status AS old_status
)
INSERT INTO {audit} (entity_id, entity_type, action, changed_by, changed_at, request_id, old_value, new_value)
SELECT id, 'task', 'updated', 'bench-raw', $3, $4, jsonb_build_object('status', old_status),
    jsonb_build_object('status', $1::text) FROM changed
"""


BULK = {
    "plain raw SQL": bulk_sql("plain_task", "plain_audit", ""),
    "raw SQL on our tables": bulk_sql("entity", "audit_entry", "kind = 'task' AND"),
}

CREATE = {
    "plain raw SQL": (
        "INSERT INTO plain_task (title, description, status, priority, project_id, created_at, updated_at, "
        "version) VALUES ($1, '', 'pending', 1, $2, $3, $3, 1) RETURNING id",
        "INSERT INTO plain_audit (entity_id, entity_type, action, changed_by, changed_at, request_id, "
        "new_value) VALUES ($1, 'task', 'created', $2, $3, $4, $5)",
    ),
    "raw SQL on our tables": (
        "INSERT INTO entity (kind, title, description, status, priority, project_id, created_at, updated_at, "
        "version) VALUES ('task', $1, '', 'pending', 1, $2, $3, $3, 1) RETURNING id",
        "INSERT INTO audit_entry (entity_id, entity_type, action, changed_by, changed_at, request_id, "
        "new_value) VALUES ($1, 'task', 'created', $2, $3, $4, $5)",
    ),
}


async def bulk(url: str, server: StdioServer, projects: list[int], rounds: int) -> dict[str, Any]:
    """Flip every live task of `projects` between two statuses; every timed run changes them all.
    Raw SQL on our tables and our server change the same rows, so each flips them back."""
    conn = await asyncpg.connect(url)
    results: dict[str, list[float]] = {name: [] for name in [*BULK, "our server"]}
    statuses = ["cancelled", "pending"]
    tables = {"plain raw SQL": "plain", "raw SQL on our tables": "ours", "our server": "ours"}
    status = {"plain": statuses[0], "ours": statuses[0]}
    try:
        for sql in BULK.values():  # from the loaded mix to one status: not timed
            await conn.execute(sql, statuses[0], projects, datetime.now(UTC), "warm")
        for _ in range(rounds):
            for name in results:
                table = tables[name]
                status[table] = statuses[1 - statuses.index(status[table])]
                started = time.perf_counter()
                if name == "our server":
                    _, result = await server.call(
                        "bulk_update_status", _bulk_arguments(status[table], projects)
                    )
                    changed = int(result["structuredContent"]["changed_count"])
                else:
                    async with conn.transaction():
                        outcome = await conn.execute(
                            BULK[name], status[table], projects, datetime.now(UTC), uuid.uuid4().hex
                        )
                    changed = int(outcome.split()[-1])
                results[name].append(changed / (time.perf_counter() - started))
            logger.info("bulk round: %s", {k: round(v[-1]) for k, v in results.items()})
    finally:
        await conn.close()
    return {name: _rates(rates) for name, rates in results.items()}


def _bulk_arguments(status: str, projects: list[int]) -> dict[str, Any]:
    return {"status": status, "filter": {"field": "project_id", "op": "in", "value": projects}}


def _rates(rates: list[float]) -> dict[str, Any]:
    return {"median_rows_per_s": round(statistics.median(rates)), "runs": [round(r) for r in rates]}


async def raw_writers(url: str, name: str, writers: int, seconds: float, project: int) -> float:
    """Creates per second by `writers` connections, each a task and its audit row per transaction."""
    task_sql, audit_sql = CREATE[name]
    connections = [await asyncpg.connect(url) for _ in range(writers)]
    done = 0
    deadline = time.perf_counter() + seconds

    async def writer(conn: asyncpg.Connection, n: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            now = datetime.now(UTC)
            async with conn.transaction():
                task_id = await conn.fetchval(task_sql, f"writer {n}", project, now)
                await conn.execute(audit_sql, task_id, f"writer-{n}", now, uuid.uuid4().hex, '{"title": "w"}')
            done += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(writer(conn, n) for n, conn in enumerate(connections)))
    finally:
        for conn in connections:
            await conn.close()
    return done / (time.perf_counter() - started)


async def server_writers(servers: list[StdioServer], seconds: float, project: int) -> tuple[float, float]:
    """create_task calls per second by one agent per server process, and server CPU ms per call."""
    done = 0
    deadline = time.perf_counter() + seconds
    cpu_before = sum(_cpu_seconds(server) for server in servers)

    async def agent(server: StdioServer, n: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await server.call("create_task", {"title": f"agent {n}", "project_id": project})
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(agent(server, n) for n, server in enumerate(servers)))
    elapsed = time.perf_counter() - started
    cpu = sum(_cpu_seconds(server) for server in servers) - cpu_before
    return done / elapsed, cpu * 1000 / max(done, 1)


def _cpu_seconds(server: StdioServer) -> float:
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


async def start_servers(url: str, count: int, logs: Path) -> list[StdioServer]:
    servers = []
    for n in range(count):
        env = {"DATABASE_URL": url, "MCP_AGENT_ID": f"bench-agent-{n}", "LOG_LEVEL": "WARNING"}
        env["DB_STATEMENT_TIMEOUT_MS"] = "300000"  # a bulk change of 100,000 tasks is measured, not cut off
        command = [sys.executable, "-m", "mcp_server"]
        servers.append(await StdioServer.start(f"ours-{n}", command, env, logs / f"server-{n}.log"))
    return servers


async def seal_delays(url: str, since: datetime, until: datetime) -> dict[str, Any]:
    """The delay from each entry's change to its seal, for entries written from `since` to `until`."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS sealed, "
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY s.sealed_at - e.changed_at) AS p50, "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY s.sealed_at - e.changed_at) AS p99, "
            "max(s.sealed_at - e.changed_at) AS max "
            "FROM audit_seal s JOIN audit_entry e ON e.id = s.entry_id WHERE e.changed_at BETWEEN $1 AND $2",
            since,
            until,
        )
        unsealed = await conn.fetchval(
            "SELECT count(*) FROM audit_entry e WHERE e.changed_at BETWEEN $1 AND $2 AND e.seq IS NULL "
            "AND NOT EXISTS (SELECT FROM audit_seal s WHERE s.entry_id = e.id)",
            since,
            until,
        )
    finally:
        await conn.close()
    ms = {
        key: None if row[key] is None else round(row[key].total_seconds() * 1000, 1)
        for key in ("p50", "p99", "max")
    }
    return {"sealed": row["sealed"], "unsealed_at_end": unsealed, **{f"{k}_ms": v for k, v in ms.items()}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    setup = await asyncpg.connect(args.postgres)
    try:
        for statement in PLAIN_SCHEMA:
            await setup.execute(statement)
        project = await setup.fetchval("SELECT max(project_id) FROM entity WHERE kind = 'task'")
    finally:
        await setup.close()
    logs = Path(tempfile.mkdtemp(prefix="bench-writers-"))
    started_at = datetime.now(UTC)
    results: dict[str, Any] = {"started": started_at.isoformat(), "writers": {}}
    servers = await start_servers(args.postgres, max(args.writers), logs)
    try:
        projects = list(range(1, args.bulk_projects + 1))
        results["bulk"] = await bulk(args.postgres, servers[0], projects, args.bulk_rounds)
        writers_started = datetime.now(UTC)
        for writers in args.writers:
            row: dict[str, Any] = {}
            for name in CREATE:
                row[name] = round(await raw_writers(args.postgres, name, writers, args.seconds, project))
            rate, cpu_ms = await server_writers(servers[:writers], args.seconds, project)
            row["our server"] = round(rate)
            row["our server CPU ms per call"] = round(cpu_ms, 2)
            results["writers"][str(writers)] = row
            logger.info("%d writers: %s", writers, row)
        await asyncio.sleep(2)  # the sealer's last round
        ended = datetime.now(UTC)
        results["seal delay"] = {
            "bulk changes": await seal_delays(args.postgres, started_at, writers_started),
            "concurrent creates": await seal_delays(args.postgres, writers_started, ended),
        }
    finally:
        for server in servers:
            await server.close()
        cleanup = await asyncpg.connect(args.postgres)
        try:
            await cleanup.execute(DROP_PLAIN)
        finally:
            await cleanup.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgres", required=True, metavar="URL", help="a loaded benchmark database (it writes)"
    )
    parser.add_argument(
        "--bulk-projects", type=int, default=100, help="projects whose tasks the bulk change flips"
    )
    parser.add_argument("--bulk-rounds", type=int, default=3)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each writers run lasts")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    results = asyncio.run(run(args))
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stderr.write(text + "\n")


if __name__ == "__main__":
    main()
