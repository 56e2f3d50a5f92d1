"""The claim race, measured: sixteen agents on two stateless HTTP server processes work one ready
queue to the end, as tests/test_claims.py races them, but with more tasks and the clock running.

Each agent claims the next ready task (`claim_task` without a task, a 10 s lease) and completes it
under its fencing token, until nothing is left. Three agents die holding a task: their leases run
out and the living take those tasks again; then the dead come back and try to complete them under
their old tokens. Counted: claims, completions, conflicts (a claim or a write refused because
another agent held the task or its token was stale), empty claims (nothing free at that moment),
reclaimed leases, and the throughput of claim-and-complete. Then the audit log is read back to
check the story: every task completed once, by the agent that last claimed it, and no two live
claims of a task overlapped.

    python -m bench.race --postgres URL_OF_A_DATABASE_IT_MAY_DROP [--tasks 2000] [--sqlite]

It drops and creates the PostgreSQL database it is given (name it for this: mcp_bench_race).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.writers import _free_port, _listening
from mcp_server.auth import mint_token, token_sha256

logger = logging.getLogger("bench.race")

AGENTS = 16
DYING = 3
LEASE_SECONDS = 10


async def fresh_postgres(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    migrate = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_server", "migrate", env={**os.environ, "DATABASE_URL": url}
    )
    if await migrate.wait() != 0:
        raise RuntimeError("migrate failed")


@contextlib.asynccontextmanager
async def server(config: Path, logs: Path, name: str) -> Any:
    port = _free_port()
    command = [sys.executable, "-m", "mcp_server", "--config", str(config), "serve", "--transport", "http"]
    with (logs / f"{name}.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, "--port", str(port), "--stateless", stdout=log, stderr=log
        )
    try:
        await _listening(port)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        await process.wait()


@contextlib.asynccontextmanager
async def client(url: str, token: str) -> Any:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http), mode="auto") as connected,
    ):
        yield connected


def text_of(result: Any) -> str:
    return " ".join(getattr(part, "text", "") for part in result.content)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    logs = Path(tempfile.mkdtemp(prefix="bench-race-"))
    if args.sqlite:
        url = f"sqlite:///{logs / 'race.db'}"
    else:
        url = args.postgres
        await fresh_postgres(url)
    tokens = {f"agent-{n:02}": mint_token() for n in range(AGENTS)}
    config = logs / "config.json"
    agents = [{"id": agent, "token_sha256": token_sha256(token)} for agent, token in tokens.items()]
    # Measured: the server's speed, not the agents' rate limit.
    settings = {"database_url": url, "log_level": "WARNING", "agents": agents, "http_requests_per_second": 0}
    config.write_text(json.dumps(settings))
    counts: Counter[str] = Counter(dict.fromkeys(("claims", "completed", "conflicts", "empty claims"), 0))
    dead: dict[str, dict[str, Any]] = {}
    async with server(config, logs, "first") as first, server(config, logs, "second") as second:
        servers = [first, second]
        async with client(first, tokens["agent-00"]) as setup:
            project = (await setup.call_tool("create_project", {"name": "the race"})).structured_content
            assert project is not None
            for n in range(args.tasks):
                arguments = {
                    "title": f"race task {n}",
                    "project_id": project["id"],
                    "priority": "high" if n % 7 else "low",
                }
                created = await setup.call_tool("create_task", arguments)
                assert not created.is_error, text_of(created)
        dying = {f"agent-{n:02}" for n in range(DYING)}

        async def work(agent: str, url: str) -> None:
            async with client(url, tokens[agent]) as connected:
                while True:
                    claimed = await connected.call_tool("claim_task", {"lease_seconds": LEASE_SECONDS})
                    if claimed.is_error:
                        message = text_of(claimed)
                        if "no task is free" not in message:
                            counts["conflicts"] += 1
                            continue
                        counts["empty claims"] += 1
                        if remaining() == 0:
                            return
                        await asyncio.sleep(0.5)  # the dead agents' leases have not run out yet
                        continue
                    task = claimed.structured_content
                    assert task is not None and task["claim"]["holder"] == agent
                    counts["claims"] += 1
                    if agent in dying and agent not in dead:
                        dead[agent] = task  # it dies holding the task
                        return
                    done = {
                        "task_id": task["id"],
                        "status": "completed",
                        "fencing_token": task["claim"]["fencing_token"],
                    }
                    finished = await connected.call_tool("update_task", done)
                    if finished.is_error:
                        counts["conflicts"] += 1
                        continue
                    counts["completed"] += 1

        def remaining() -> int:
            return args.tasks - counts["completed"]

        logger.info("%d tasks made; the race begins", args.tasks)
        started = time.perf_counter()
        await asyncio.gather(*(work(agent, servers[n % 2]) for n, agent in enumerate(sorted(tokens))))
        elapsed = time.perf_counter() - started
        for agent, task in dead.items():  # back from the dead, too late
            async with client(first, tokens[agent]) as connected:
                late = {
                    "task_id": task["id"],
                    "status": "cancelled",
                    "fencing_token": task["claim"]["fencing_token"],
                }
                refused = await connected.call_tool("update_task", late)
                assert refused.is_error and "is stale" in text_of(refused), text_of(refused)
                counts["stale writes refused"] += 1
    story = await audit_story(url)
    reclaimed = sum(1 for claims in story.values() if len(claims) > 1)
    return {
        "database": "sqlite" if args.sqlite else "postgresql",
        "agents": AGENTS,
        "server processes": 2,
        "tasks": args.tasks,
        "seconds": round(elapsed, 2),
        "lease (s)": LEASE_SECONDS,
        "claim-and-complete per second": round(counts["completed"] / elapsed, 1),
        **dict(counts),
        "reclaimed leases": reclaimed,
        "audit check": "every task completed once, by its last claimer; no overlapping live claims",
    }


async def audit_story(url: str) -> dict[int, list[tuple[str, str]]]:
    """Each task's claims in commit order, checked: completed once, by the agent that claimed it last."""
    query = (
        "SELECT entity_id, changed_by, action, new_value, changed_at FROM audit_entry "
        "WHERE action IN ('claimed', 'updated') ORDER BY id"
    )
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            rows = [(r[0], r[1], r[2], json.loads(r[3]), _time(r[4])) for r in conn.execute(query)]
    else:
        conn = await asyncpg.connect(url)
        try:
            rows = [(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in await conn.fetch(query)]
        finally:
            await conn.close()
    story: dict[int, list[tuple[str, datetime, datetime]]] = {}  # (holder, claimed at, lease end)
    finished: dict[int, str] = {}
    for entity_id, by, action, new, at in rows:
        if action == "claimed":
            assert entity_id not in finished, f"task {entity_id} claimed after it was completed"
            earlier = story.setdefault(entity_id, [])
            # Nothing released a claim in this race: a new one must start after the last one ended.
            assert not earlier or at >= earlier[-1][2], f"task {entity_id}: two live claims overlapped"
            earlier.append((by, at, _time(new["claim_expires_at"])))
        elif new.get("status") == "completed":
            assert entity_id not in finished, f"task {entity_id} completed twice"
            assert story[entity_id][-1][0] == by, f"task {entity_id} completed by {by}, not its last claimer"
            finished[entity_id] = by
    assert len(finished) == len(story), "a claimed task was never completed"
    return story


def _time(text: str) -> datetime:
    """A time as SQLite or an audit value holds it, as an aware UTC datetime."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/mcp_bench_race")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument(
        "--sqlite", action="store_true", help="a SQLite file shared by both processes instead"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    for name in ("httpx", "httpx2"):  # a line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    results = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"race-{results['database']}.json").write_text(json.dumps(results, indent=2) + "\n")
    logger.info("%s", json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
