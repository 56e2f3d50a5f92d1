"""The ready queue side by side: agents that each take the next free task and give it back, over
and over, three ways on one loaded PostgreSQL database in one run.

- plain raw SQL: asyncpg on a plain copy of the tasks (the claim's three columns and the index a
  plain application would give a queue) and a plain audit table: per round, one transaction
  claims the most urgent, oldest free task (`FOR UPDATE SKIP LOCKED`) and records it, another
  releases it and records that;
- raw SQL on our tables: the same statements on `entity` and `audit_entry`, with their triggers;
- our server: `claim_task` without a task, then `release_claim`, over stdio, one stateless
  server process per agent, each agent calling again when its last call returns.

Each way is measured for each number of agents; a round is a claim and its release. The queue's
order is the default of `claim_task`: most urgent first, then oldest. Every round writes: the
audit log grows by two entries a round, and the tasks' fencing tokens grow, but no task changes
status, so the other benchmarks' data stays as it was.
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from bench.stdio import StdioServer, cpu_seconds
from bench.writers import start_servers

logger = logging.getLogger("bench.queue")

LEASE = "300 seconds"
PLAIN_SCHEMA = [
    "DROP TABLE IF EXISTS plain_queue_audit, plain_queue",
    """CREATE TABLE plain_queue AS SELECT id, status, priority, created_at, NULL::varchar(200) AS claimed_by,
        NULL::timestamptz AS claim_expires_at, 0::bigint AS fencing_token
        FROM entity WHERE kind = 'task' AND deleted_at IS NULL""",
    "ALTER TABLE plain_queue ADD PRIMARY KEY (id)",
    "CREATE INDEX ON plain_queue (priority DESC, created_at, id) WHERE status IN ('pending', 'in_progress')",
    """CREATE TABLE plain_queue_audit (id bigserial PRIMARY KEY, task_id bigint NOT NULL,
        action varchar(16) NOT NULL, changed_by varchar(200) NOT NULL, changed_at timestamptz NOT NULL,
        request_id varchar(64) NOT NULL, new_value jsonb)""",
    "ANALYZE plain_queue",
]
DROP_PLAIN = "DROP TABLE IF EXISTS plain_queue_audit, plain_queue"


def _claim_sql(tasks: str, live: str) -> str:
    return f"""
    UPDATE {tasks} SET claimed_by = $1, claim_expires_at = now() + interval '{LEASE}',
        fencing_token = fencing_token + 1
    WHERE id = (
        SELECT id FROM {tasks}
        WHERE {live} AND status IN ('pending', 'in_progress')
            AND (claimed_by IS NULL OR claim_expires_at <= now())
        ORDER BY priority DESC, created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING id, fencing_token"""


def _release_sql(tasks: str) -> str:
    return f"""UPDATE {tasks} SET claimed_by = NULL, claim_expires_at = NULL
        WHERE id = $1 AND fencing_token = $2 AND claimed_by = $3"""


# name -> (claim, release, record): the same statements on a plain table and on ours.
WAYS = {
    "plain raw SQL": (
        _claim_sql("plain_queue", "true"),
        _release_sql("plain_queue"),
        """INSERT INTO plain_queue_audit (task_id, action, changed_by, changed_at, request_id, new_value)
            VALUES ($1, $2, $3, now(), $4, $5)""",
    ),
    "raw SQL on our tables": (
        _claim_sql("entity", "kind = 'task' AND deleted_at IS NULL"),
        _release_sql("entity"),
        """INSERT INTO audit_entry (entity_id, entity_type, action, changed_by, changed_at, request_id, new_value)
            VALUES ($1, 'task', $2, $3, now(), $4, $5)""",
    ),
}


async def raw_rounds(url: str, way: str, agents: int, seconds: float) -> float:
    """Rounds (a claim and its release, each recorded) per second by `agents` connections."""
    claim, release, record = WAYS[way]
    connections = [await asyncpg.connect(url) for _ in range(agents)]
    done = 0
    deadline = time.perf_counter() + seconds

    async def agent(conn: asyncpg.Connection, n: int) -> None:
        nonlocal done
        me = f"raw-agent-{n}"
        while time.perf_counter() < deadline:
            async with conn.transaction():
                row = await conn.fetchrow(claim, me)
                assert row is not None, "the queue ran dry"
                await conn.execute(record, row["id"], "claimed", me, uuid.uuid4().hex, '{"claimed_by": "x"}')
            async with conn.transaction():
                await conn.execute(release, row["id"], row["fencing_token"], me)
                await conn.execute(
                    record, row["id"], "released", me, uuid.uuid4().hex, '{"claimed_by": null}'
                )
            done += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(agent(conn, n) for n, conn in enumerate(connections)))
    finally:
        for conn in connections:
            await conn.close()
    return done / (time.perf_counter() - started)


Round = Callable[[], Awaitable[float]]  # one claim and its release; the claim's seconds


def _server_round(server: StdioServer) -> Round:
    async def round_() -> float:
        elapsed, claimed = await server.call("claim_task", {})
        task = claimed["structuredContent"]
        token = task["claim"]["fencing_token"]
        await server.call("release_claim", {"task_id": task["id"], "fencing_token": token})
        return elapsed

    return round_


async def server_rounds(rounds: list[Round], pids: list[int], seconds: float) -> dict[str, float]:
    """Rounds per second by one agent per server, the claims' median time, and the servers' CPU
    time per round."""
    done = 0
    claims: list[float] = []
    deadline = time.perf_counter() + seconds
    cpu_before = sum(cpu_seconds(pid) for pid in pids)

    async def agent(round_: Round) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            claims.append(await round_())
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(agent(round_) for round_ in rounds))
    elapsed = time.perf_counter() - started
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    return {
        "rounds_per_s": done / elapsed,
        "claim_p50_ms": statistics.median(claims) * 1000,
        "cpu_ms_per_round": cpu * 1000 / max(done, 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    setup = await asyncpg.connect(args.postgres)
    try:
        for statement in PLAIN_SCHEMA:
            await setup.execute(statement)
        free = await setup.fetchval(
            "SELECT count(*) FROM plain_queue WHERE status IN ('pending', 'in_progress')"
        )
    finally:
        await setup.close()
    logs = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    results: dict[str, Any] = {"free tasks": free, "agents": {}}
    *servers, sealer = await start_servers(args.postgres, max(args.agents), logs)
    try:
        for agents in args.agents:
            row: dict[str, Any] = {}
            for way in WAYS:
                row[f"{way}, rounds/s"] = round(await raw_rounds(args.postgres, way, agents, args.seconds))
            measured = await server_rounds(
                [_server_round(server) for server in servers[:agents]],
                [server.pid for server in servers[:agents]],
                args.seconds,
            )
            row["our server (stdio), rounds/s"] = round(measured["rounds_per_s"])
            row["claim_task p50 ms"] = round(measured["claim_p50_ms"], 2)
            row["server CPU ms per round"] = round(measured["cpu_ms_per_round"], 2)
            results["agents"][str(agents)] = row
            logger.info("%d agents: %s", agents, row)
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
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each run lasts")
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
