"""What the console's pages cost on the loaded database, beside the tool call that reads the same
thing, in one run: an operator signed in (httpx), and an agent with a token calling the tools over
streamable HTTP, against one HTTP server process. Each page and its tool call are fetched in turn
(ABAB...), timed from the request sent to the last byte read; p50 and p95 in ms.

- the board, unfiltered and by status, against search_tasks with the same filter and total;
- a task's page (the task with the longest history), against get_audit_trail of that task;
- the agents page (activity over the last day) and the audit page (chain head, checkpoint);
- a changeset of every pending task of the largest project: the preview (bulk_update_status,
  dry_run) and its page, whose items the operator reads before approving.

    python -m bench.console --postgres URL [--calls 100] [--out FILE]

The preview writes a changeset (deleted when it expires): run it on the benchmark's data.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.writers import _free_port, _listening
from mcp_server.auth import token_sha256
from mcp_server.operators import hash_password

logger = logging.getLogger("bench.console")

PASSWORD = "bench operator password"
TOKEN = "bench-console-agent-" + "t" * 32
Fetch = Callable[[], Awaitable[None]]


async def timed(fetch: Fetch) -> float:
    started = time.perf_counter()
    await fetch()
    return time.perf_counter() - started


async def pair(calls: int, named: dict[str, Fetch]) -> dict[str, Any]:
    """Each fetch `calls` times, in turn; p50 and p95 of each in ms."""
    times: dict[str, list[float]] = {name: [] for name in named}
    for n in range(calls):
        order = list(named.items()) if n % 2 == 0 else list(reversed(named.items()))
        for name, fetch in order:
            times[name].append(await timed(fetch))
    return {
        name: {
            "p50 ms": round(statistics.median(measured) * 1000, 1),
            "p95 ms": round(sorted(measured)[int(len(measured) * 0.95)] * 1000, 1),
        }
        for name, measured in times.items()
    }


async def sign_in(http: httpx2.AsyncClient) -> None:
    form = await http.get("/console/sign-in")
    token = re.search(r'name="form_token" value="([^"]+)"', form.text)
    assert token is not None
    signed = await http.post(
        "/console/sign-in", data={"operator": "bench", "password": PASSWORD, "form_token": token.group(1)}
    )
    assert signed.status_code == 303, signed.text


def page(http: httpx2.AsyncClient, path: str) -> Fetch:
    async def fetch() -> None:
        response = await http.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])

    return fetch


def tool(client: Client, name: str, arguments: dict[str, Any]) -> Fetch:
    async def fetch() -> None:
        result = await client.call_tool(name, arguments)
        assert not result.is_error, result.content

    return fetch


async def run(args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(args.postgres)
    try:
        task_id = await conn.fetchval(
            "SELECT entity_id FROM audit_entry WHERE entity_type = 'task' GROUP BY entity_id "
            "ORDER BY count(*) DESC LIMIT 1"
        )
        largest = await conn.fetchrow(
            "SELECT project_id, count(*) AS tasks FROM entity WHERE kind = 'task' AND deleted_at IS NULL "
            "AND status = 'pending' GROUP BY project_id ORDER BY count(*) DESC LIMIT 1"
        )
        sizes = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM entity WHERE kind = 'task') AS tasks, "
            "(SELECT count(*) FROM audit_entry) AS entries"
        )
    finally:
        await conn.close()
    logs = Path(tempfile.mkdtemp(prefix="bench-console-"))
    config = logs / "config.json"
    config.write_text(
        json.dumps(
            {
                "database_url": args.postgres,
                "log_level": "WARNING",
                "http_requests_per_second": 0,  # measured: the server's speed, not the agent's rate limit
                "agents": [{"id": "bench-agent", "token_sha256": token_sha256(TOKEN)}],
                "operators": [{"id": "bench", "password_scrypt": hash_password(PASSWORD)}],
                "console": {},
            }
        )
    )
    port = _free_port()
    log = (logs / "server.log").open("w")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mcp_server",
        "--config",
        str(config),
        "serve",
        "--transport",
        "http",
        "--port",
        str(port),
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {
        "tasks": sizes["tasks"],
        "audit entries": sizes["entries"],
        "task with the longest history": task_id,
        "changeset's tasks": largest["tasks"],
    }
    try:
        await _listening(port)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with (
            httpx2.AsyncClient(base_url=base, timeout=120) as operator,
            httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as agent_http,
            Client(streamable_http_client(f"{base}/mcp", http_client=agent_http)) as agent,  # type: ignore[arg-type]
        ):
            await sign_in(operator)
            pending = {"field": "status", "op": "eq", "value": "pending"}
            results["board, unfiltered"] = await pair(
                args.calls,
                {
                    "page": page(operator, "/console"),
                    "search_tasks": tool(
                        agent,
                        "search_tasks",
                        {
                            "order_by": [{"field": "updated_at", "direction": "desc"}],
                            "limit": 50,
                            "include_total": True,
                        },
                    ),
                },
            )
            results["board, by status"] = await pair(
                args.calls,
                {
                    "page": page(operator, "/console?status=pending"),
                    "search_tasks": tool(
                        agent,
                        "search_tasks",
                        {
                            "filter": pending,
                            "limit": 50,
                            "include_total": True,
                            "order_by": [{"field": "updated_at", "direction": "desc"}],
                        },
                    ),
                },
            )
            results["a task's page"] = await pair(
                args.calls,
                {
                    "page": page(operator, f"/console/tasks/{task_id}"),
                    "get_audit_trail": tool(agent, "get_audit_trail", {"entity_id": task_id, "limit": 100}),
                },
            )
            results["agents and audit pages"] = await pair(
                args.calls,
                {"agents": page(operator, "/console/agents"), "audit": page(operator, "/console/audit")},
            )
            in_project = {"field": "project_id", "op": "eq", "value": largest["project_id"]}
            arguments = {"status": "in_progress", "filter": in_project, "dry_run": True}
            started = time.perf_counter()
            preview = await agent.call_tool("bulk_update_status", arguments)
            results["the changeset: preview ms"] = round((time.perf_counter() - started) * 1000, 1)
            changeset = (preview.structured_content or {})["changeset"]["id"]
            results["the changeset: its page"] = (
                await pair(args.calls // 4 or 1, {"page": page(operator, f"/console/changesets/{changeset}")})
            )["page"]
    finally:
        process.terminate()
        await process.wait()
        log.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", required=True, metavar="URL", help="a loaded benchmark database")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    results = asyncio.run(run(args))
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stderr.write(text + "\n")


if __name__ == "__main__":
    main()
