"""Writers side by side: a bulk status change and concurrent creators, each done three ways on one
PostgreSQL database in one run, and the sealer's delay.

- plain raw SQL: asyncpg on a plain task table and a plain audit table (no triggers, no chain);
- raw SQL on our tables: the same statements on `entity` and `audit_entry`, with their triggers;
- our server: the tools over stdio, one server process per concurrent agent (stateless servers
  on one database, as it scales out), each agent sending its next call when the last returns;
  the bulk change also as an agent makes it bound to a preview: a dry run, whose changeset (every
  task with its version) is written, then apply_changeset, which re-checks each version;
  and the concurrent creators once more over streamable HTTP, one stateless server process
  serving every agent, each with its own token (the 2026-07-28 era of the SDK's client).

The plain tables are copies of the loaded tasks and of the audit history (5,000,000 entries on the
full data), with the indexes a plain application would give them, made by this script. The call
servers run without their sealers; one more server process, which gets no calls, does all the
sealing, so its CPU time is the sealer's (its statements' time on PostgreSQL is not in it).
Afterwards the script reads each sealed entry's delay (sealed_at - changed_at) from the database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.stdio import StdioServer, cpu_seconds
from mcp_server.auth import mint_token, token_sha256

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
    # The same history as ours: inserting into a table of millions of rows is not inserting into an empty one.
    """INSERT INTO plain_audit SELECT id, entity_id, entity_type, action, changed_by, client_name, changed_at,
        request_id, old_value, new_value FROM audit_entry""",
    "SELECT setval('plain_audit_id_seq', (SELECT coalesce(max(id), 1) FROM plain_audit))",
    "CREATE INDEX ON plain_audit (entity_id, changed_at, id)",
    "CREATE INDEX ON plain_audit (changed_by, changed_at)",
    "CREATE INDEX ON plain_audit (request_id)",
    "CREATE INDEX ON plain_audit (changed_at, id)",
    "VACUUM ANALYZE plain_task",
    "VACUUM ANALYZE plain_audit",
]
DROP_PLAIN = "DROP TABLE IF EXISTS plain_audit, plain_task"
# The bulk change as a dry run's changeset, then applied (changesets.py).
PREVIEWED = "our server, preview then apply_changeset"


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
    results: dict[str, list[float]] = {name: [] for name in [*BULK, "our server", PREVIEWED]}
    phases: list[tuple[float, float]] = []  # PREVIEWED: (preview s, apply s)
    statuses = ["cancelled", "pending"]
    tables = {
        "plain raw SQL": "plain",
        "raw SQL on our tables": "ours",
        "our server": "ours",
        PREVIEWED: "ours",
    }
    status = {"plain": statuses[0], "ours": statuses[0]}
    try:
        for sql in BULK.values():  # from the loaded mix to one status: not timed
            await conn.execute(sql, statuses[0], projects, datetime.now(UTC), "warm")
        for _ in range(rounds):
            for name in results:
                table = tables[name]
                status[table] = statuses[1 - statuses.index(status[table])]
                # Our tables are changed twice a round (raw SQL, then our server), the plain ones
                # once: without a vacuum before each run ours would carry twice the dead rows.
                await conn.execute(VACUUM[table])
                started = time.perf_counter()
                if name == "our server":
                    _, result = await server.call(
                        "bulk_update_status", _bulk_arguments(status[table], projects)
                    )
                    changed = int(result["structuredContent"]["changed_count"])
                elif name == PREVIEWED:
                    # The dry run writes the changeset; applying it locks, re-checks every version
                    # and makes the change: the two calls an agent makes, timed together.
                    arguments = _bulk_arguments(status[table], projects) | {"dry_run": True}
                    _, preview = await server.call("bulk_update_status", arguments)
                    previewed = time.perf_counter()
                    changeset = preview["structuredContent"]["changeset"]["id"]
                    _, result = await server.call("apply_changeset", {"changeset_id": changeset})
                    changed = int(result["structuredContent"]["changed_count"])
                    phases.append((previewed - started, time.perf_counter() - previewed))
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
    shown: dict[str, Any] = {name: _rates(rates) for name, rates in results.items()}
    shown[f"{PREVIEWED}: median preview s, apply s"] = [
        round(statistics.median(phase), 3) for phase in zip(*phases, strict=True)
    ]
    return shown


def _stdio_create(server: StdioServer, project: int) -> Create:
    async def create(n: int) -> object:
        # A distinct title each time, as real work has: the duplicate guard refuses a repeat.
        title = f"agent {n} task {uuid.uuid4().hex[:12]}"
        return await server.call("create_task", {"title": title, "project_id": project})

    return create


VACUUM = {"plain": "VACUUM ANALYZE plain_task, plain_audit", "ours": "VACUUM ANALYZE entity, audit_entry"}


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


Create = Callable[[int], Awaitable[object]]  # agent n creates one task


async def server_writers(agents: list[Create], pids: list[int], seconds: float) -> dict[str, float]:
    """create_task calls per second by `agents`, each calling again when its last call returns, and
    the CPU time per call of the server processes `pids` and of the sealer."""
    done = 0
    deadline = time.perf_counter() + seconds
    cpu_before = sum(cpu_seconds(pid) for pid in pids)

    async def agent(create: Create, n: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await create(n)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(agent(create, n) for n, create in enumerate(agents)))
    elapsed = time.perf_counter() - started
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    return {"calls_per_s": done / elapsed, "cpu_ms_per_call": cpu * 1000 / max(done, 1)}


def _config(url: str, logs: Path, name: str, **settings: Any) -> Path:
    path = logs / f"{name}.json"
    config = {"database_url": url, "log_level": "WARNING", "statement_timeout_ms": 300_000} | settings
    path.write_text(json.dumps(config))  # a bulk change of 100,000 tasks is measured, not cut off
    return path


async def start_servers(url: str, count: int, logs: Path) -> list[StdioServer]:
    """`count` stdio servers without sealers, and one more, last, that only seals."""
    servers = []
    for n in range(count + 1):
        sealing = n == count
        name = "sealer" if sealing else f"ours-{n}"
        config = _config(url, logs, name, agent_id=f"bench-agent-{n}", sealer=sealing)
        command = [sys.executable, "-m", "mcp_server", "--config", str(config)]
        servers.append(await StdioServer.start(name, command, {}, logs / f"{name}.log"))
    return servers


async def http_writers(url: str, agents: int, seconds: float, project: int, logs: Path) -> dict[str, float]:
    """`agents` creators over streamable HTTP against one stateless server process."""
    tokens = {f"http-agent-{n}": mint_token() for n in range(agents)}
    entries = [{"id": agent, "token_sha256": token_sha256(token)} for agent, token in tokens.items()]
    port = _free_port()
    config = _config(url, logs, "http", agents=entries, sealer=False)
    command = [sys.executable, "-m", "mcp_server", "--config", str(config), "serve", "--transport", "http"]
    with (logs / "http.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, "--port", str(port), "--stateless", stdout=log, stderr=log
        )
    endpoint = f"http://127.0.0.1:{port}/mcp"
    try:
        await _listening(port)
        async with contextlib.AsyncExitStack() as stack:
            clients = []
            for token in tokens.values():
                http = await stack.enter_async_context(
                    httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60)
                )
                transport = streamable_http_client(endpoint, http_client=http)
                clients.append(await stack.enter_async_context(Client(transport, mode="auto")))

            async def create(n: int) -> object:
                result = await clients[n].call_tool(
                    "create_task", {"title": f"http {n} task {uuid.uuid4().hex[:12]}", "project_id": project}
                )
                if result.is_error:
                    raise RuntimeError(f"create_task over HTTP failed: {result.content}")
                return result

            return await server_writers([create] * agents, [process.pid], seconds)
    finally:
        process.terminate()
        await process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _listening(port: int) -> None:
    for _ in range(300):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)  # polling for the server to start listening
            continue
        writer.close()
        return
    raise RuntimeError("the HTTP server did not start listening within 30 s")


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
    *servers, sealer = await start_servers(args.postgres, max(args.writers), logs)
    try:
        projects = list(range(1, args.bulk_projects + 1))
        sealer_cpu = sealer.cpu_seconds()
        results["bulk"] = await bulk(args.postgres, servers[0], projects, args.bulk_rounds)
        results["sealer CPU s during the bulk changes"] = round(sealer.cpu_seconds() - sealer_cpu, 2)
        writers_started = datetime.now(UTC)
        for writers in args.writers:
            row: dict[str, Any] = {}
            for name in CREATE:
                row[name] = round(await raw_writers(args.postgres, name, writers, args.seconds, project))
            sealer_cpu = sealer.cpu_seconds()
            stdio_agents = [_stdio_create(server, project) for server in servers[:writers]]
            over_stdio = await server_writers(stdio_agents, [s.pid for s in servers[:writers]], args.seconds)
            row["our server, stdio"] = round(over_stdio["calls_per_s"])
            row["server CPU ms per call, stdio"] = round(over_stdio["cpu_ms_per_call"], 2)
            row["sealer CPU ms per call, stdio"] = round(
                (sealer.cpu_seconds() - sealer_cpu) * 1000 / max(over_stdio["calls_per_s"] * args.seconds, 1),
                2,
            )
            over_http = await http_writers(args.postgres, writers, args.seconds, project, logs)
            row["our server, HTTP"] = round(over_http["calls_per_s"])
            row["server CPU ms per call, HTTP"] = round(over_http["cpu_ms_per_call"], 2)
            results["writers"][str(writers)] = row
            logger.info("%d writers: %s", writers, row)
        await asyncio.sleep(2)  # the sealer's last round
        ended = datetime.now(UTC)
        results["seal delay"] = {
            "bulk changes": await seal_delays(args.postgres, started_at, writers_started),
            "concurrent creates": await seal_delays(args.postgres, writers_started, ended),
        }
    finally:
        for server in [*servers, sealer]:
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
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request would be the client's work
    results = asyncio.run(run(args))
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stderr.write(text + "\n")


if __name__ == "__main__":
    main()
