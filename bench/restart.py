"""What agents are told when PostgreSQL restarts under load: eight agents write and read through one
streamable-HTTP server process while its PostgreSQL cluster is restarted (`pg_ctl restart -m fast`
or `-m immediate`; `none` is the same load without a restart).

Each run gets a fresh migrated database and one stateless HTTP server process; for `--seconds` each
agent creates a task, changes it (update_task) and searches its project, call after call, and
halfway through the cluster is restarted. A failed call is "with advice" when its text says what
happened and what to do (retry, busy, unreachable, may have been applied, idempotency_key), "bare"
when it is only `Error executing tool X`, "other" otherwise, "client exc." when the client raised.
Then: does the server still answer a new client; how many audit entries are unsealed `--seal-wait`
seconds after the load, the server still up (is its sealer still sealing? verify-audit-log seals
what is left itself, so it would not show); acknowledged changes missing from the database, and
failed ones applied anyway; does `verify-audit-log` pass; the server log's tracebacks, by chain.

    python -m bench.restart [--runs 2] [--seconds 20] [--modes fast immediate none]

It makes its own cluster with initdb (--pg-bin, default `pg_config --bindir`) in a new temporary
directory, listening on a free port of 127.0.0.1 only, and deletes it at the end; as root, it runs
PostgreSQL as the `postgres` OS user (initdb refuses root). Results: bench/results/restart.json;
the server logs stay in a temporary directory, named in the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from mcp import Client

from bench.race import client, fresh_postgres, server, text_of
from bench.writers import _free_port
from mcp_server.auth import mint_token, token_sha256

logger = logging.getLogger("bench.restart")

ADVICE = ("retry", "busy", "unreachable", "may have been applied", "idempotency_key")
BARE = re.compile(r"^Error executing tool \w+$")
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\w+) ([\w.]+): (.*)$")  # the server's log lines
EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Group|Timeout|Cancelled\w*))(?::|$)")
STATUSES = ["in_progress", "blocked", "pending", "completed"]
AFTER = "after the load"


@dataclass
class Call:
    tool: str
    ok: bool
    kind: str  # ok, advice, bare, other, client exc.
    message: str = ""
    title: str = ""  # create_task: the title asked for
    task: int | None = None  # create_task: the id acknowledged


async def command(*argv: str, check: bool = True, url: str | None = None) -> tuple[int, str]:
    """Run `argv` (with DATABASE_URL=url, if given); its exit code and output."""
    env = {**os.environ, "DATABASE_URL": url} if url else None
    pipe, stdout = asyncio.subprocess.PIPE, asyncio.subprocess.STDOUT
    process = await asyncio.create_subprocess_exec(*argv, stdout=pipe, stderr=stdout, env=env)
    out = (await process.communicate())[0].decode(errors="replace")
    if check and process.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {out[-1000:]}")
    return process.returncode or 0, out


@contextlib.asynccontextmanager
async def private_cluster(bindir: Path) -> AsyncIterator[tuple[str, Any]]:
    """A new cluster on a free port of 127.0.0.1, and its pg_ctl; stopped and deleted at the end."""
    home = Path(tempfile.mkdtemp(prefix="bench-restart-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        shutil.chown(home, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = home / "data", _free_port()

    pg_ctl = functools.partial(
        command, *as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(home / "server.log"), "-w"
    )
    try:
        await command(*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust")
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{home}'\n")
        await pg_ctl("start")
        yield f"postgresql://postgres@127.0.0.1:{port}", pg_ctl
    finally:
        await pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(home, ignore_errors=True)


async def fetch(url: str, sql: str, *params: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *params)
        return rows
    finally:
        await conn.close()


async def call(connected: Client, tool: str, arguments: dict[str, Any], calls: list[Call]) -> Call:
    try:
        result = await connected.call_tool(tool, arguments)
    except Exception as exc:  # the client itself failed: HTTP, JSON-RPC, transport
        outcome = Call(tool, False, "client exc.", f"{type(exc).__name__}: {exc}")
    else:
        text = text_of(result)
        if not result.is_error:
            outcome = Call(tool, True, "ok", task=(result.structured_content or {}).get("id"))
        elif BARE.match(text.strip()):
            outcome = Call(tool, False, "bare", text)
        else:
            advice = any(word in text.lower() for word in ADVICE)
            outcome = Call(tool, False, "advice" if advice else "other", text)
    calls.append(outcome)
    return outcome


async def agent(url: str, name: str, token: str, project: int, deadline: float, calls: list[Call]) -> None:
    task: int | None = None
    n = 0
    async with client(url, token) as connected:
        while time.perf_counter() < deadline:
            n += 1
            title = f"{name} task {n} {uuid.uuid4().hex[:8]}"  # distinct: the duplicate guard refuses repeats
            created = await call(connected, "create_task", {"title": title, "project_id": project}, calls)
            created.title = title
            task = created.task if created.ok else task
            if task is not None:  # a new description each time: every acknowledged update is one entry
                change = {"task_id": task, "status": STATUSES[n % 4], "description": f"change {n}"}
                await call(connected, "update_task", change, calls)
            search = {"filter": {"field": "project_id", "op": "eq", "value": project}, "limit": 20}
            await call(connected, "search_tasks", search, calls)


async def answers(url: str, token: str, project: int) -> str:
    """'yes' when a new client can still read and write, else what it got."""
    try:
        async with client(url, token) as connected:
            read = await connected.call_tool("search_tasks", {"limit": 1})
            write = await connected.call_tool("create_task", {"title": AFTER, "project_id": project})
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    failed = [r for r in (read, write) if r.is_error]
    return "yes" if not failed else text_of(failed[0])[:200]


async def database_check(url: str, calls: list[Call], project: int) -> dict[str, Any]:
    """The tasks and audit entries in the database against what the agents were told."""
    created = await fetch(
        url,
        "SELECT e.title, (SELECT count(*) FROM audit_entry a WHERE a.entity_id = e.id "
        "AND a.action = 'created') AS n FROM entity e WHERE e.kind = 'task' AND e.project_id = $1",
        project,
    )
    tasks = {r["title"]: r["n"] for r in created if r["title"] != AFTER}
    updated = len(
        await fetch(url, "SELECT FROM audit_entry WHERE action = 'updated' AND changed_by LIKE 'agent-%'")
    )
    creates = [c for c in calls if c.tool == "create_task"]
    acknowledged = {c.title for c in creates if c.ok}
    updates = sum(1 for c in calls if c.tool == "update_task" and c.ok)
    return {
        "tasks": len(tasks),
        "updated entries": updated,
        # An acknowledged change the database does not have: a create or an update.
        "acknowledged but missing": len(acknowledged - tasks.keys()) + max(0, updates - updated),
        # A change the agent was told failed, which the database has anyway.
        "failed but applied": sum(1 for c in creates if not c.ok and c.title in tasks)
        + max(0, updated - updates),
        "tasks without one 'created' entry": sum(1 for n in tasks.values() if n != 1),
    }


# Committed audit entries the chain has not taken in (as bench/writers.py counts them).
UNSEALED = "SELECT FROM audit_entry e WHERE e.seq IS NULL AND NOT EXISTS (SELECT FROM audit_seal s WHERE s.entry_id = e.id)"


async def verify(url: str) -> dict[str, Any]:
    code, out = await command(
        sys.executable, "-m", "mcp_server", "verify-audit-log", "--wait", "30", check=False, url=url
    )
    try:
        report, _ = json.JSONDecoder().raw_decode(out[out.index("{") :])
    except ValueError:
        return {"exit": code, "output": out[-500:]}
    keys = ("ok", "entries_checked", "unsealed", "first_problem")
    return {"exit": code} | {k: report[k] for k in keys if k in report}


def server_log(text: str) -> dict[str, Any]:
    """Records with a traceback, by logger and the exception types of their chain (cause first),
    and the warnings and errors by logger and message."""
    records: list[list[str]] = []
    for line in text.splitlines():
        if RECORD.match(line) or not records:
            records.append([line])
        else:
            records[-1].append(line)
    chains: Counter[str] = Counter()
    logged: Counter[str] = Counter()
    for first, *rest in records:
        header = RECORD.match(first)
        if header is None:
            continue
        message = re.sub(r"\[[^]]*\]", "[...]", header[3])  # request ids and agents vary
        logged[f"{header[1]} {header[2]}: {message[:150]}"] += 1
        if any(line.startswith("Traceback (most recent call last)") for line in rest):
            chain = [m[1] for line in rest if (m := EXCEPTION.match(line))]
            chains[f"{header[2]}: {' -> '.join(dict.fromkeys(chain))}"] += 1
    top = dict(logged.most_common(10))
    return {"tracebacks": sum(chains.values()), "chains": dict(chains), "records": top}


async def one_run(
    cluster: str, pg_ctl: Any, mode: str, n: int, args: argparse.Namespace, logs: Path
) -> dict[str, Any]:
    name = f"restart_{mode}_{n}"
    url = f"{cluster}/{name}"
    await fresh_postgres(url)
    tokens = {f"agent-{i:02}": mint_token() for i in range(args.agents)}
    agents = [{"id": a, "token_sha256": token_sha256(t)} for a, t in tokens.items()]
    config = logs / f"{name}.json"
    # Measured: what agents are told when the database goes away, not the per-agent request limit.
    settings = {"database_url": url, "log_level": "WARNING", "agents": agents, "http_requests_per_second": 0}
    config.write_text(json.dumps(settings))
    calls: list[Call] = []
    async with server(config, logs, name) as endpoint:
        async with client(endpoint, tokens["agent-00"]) as setup:
            project = (await setup.call_tool("create_project", {"name": name})).structured_content["id"]
        started = time.perf_counter()

        async def restart() -> dict[str, Any]:
            await asyncio.sleep(args.seconds / 2)
            if mode == "none":
                return {}
            at = time.perf_counter()
            code, out = await pg_ctl("-m", mode, "restart", check=False)
            took = {"at s": round(at - started, 2), "took s": round(time.perf_counter() - at, 2)}
            return took | ({"exit": code, "output": out[-300:]} if code else {})

        loads = [agent(endpoint, a, t, project, started + args.seconds, calls) for a, t in tokens.items()]
        restarted, *ended = await asyncio.gather(restart(), *loads, return_exceptions=True)
        after = await answers(endpoint, tokens["agent-00"], project)
        await asyncio.sleep(args.seal_wait)  # the sealer runs every 100 ms: nothing should be left
        left = len(await fetch(url, UNSEALED))
    failed = [c for c in calls if not c.ok]
    kinds = Counter(c.kind for c in failed)
    return {
        "mode": mode,
        "run": n,
        "restart": restarted if isinstance(restarted, dict) else repr(restarted),
        "agents that died": [repr(e) for e in ended if isinstance(e, BaseException)],
        "calls": len(calls),
        "failed": len(failed),
        **{kind: kinds[kind] for kind in ("advice", "bare", "other", "client exc.")},
        "messages": Counter(f"[{c.kind}] {c.message[:200]}" for c in failed).most_common(),
        "server answers after": after,
        "unsealed after": left,
        "database": await database_check(url, calls, project),
        "verify-audit-log": await verify(url),
        "server log": server_log((logs / f"{name}.log").read_text(errors="replace")),
    }


def table(runs: list[dict[str, Any]]) -> str:
    head = "| mode | run | calls | failed | with advice | bare | other | client exc. | tracebacks "
    head += "| answers after | unsealed after | acknowledged but missing | failed but applied | verify-audit-log |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        db, verified = r["database"], r["verify-audit-log"]
        lines.append(
            f"| {r['mode']} | {r['run']} | {r['calls']} | {r['failed']} | {r['advice']} | {r['bare']} "
            f"| {r['other']} | {r['client exc.']} | {r['server log']['tracebacks']} | {r['server answers after']} "
            f"| {r['unsealed after']} | {db['acknowledged but missing']} | {db['failed but applied']} "
            f"| {'ok' if verified.get('ok') else verified} |"
        )
    for r in runs:
        lines.append(f"\n{r['mode']} run {r['run']}: restart {r['restart']}; database {r['database']}")
        lines += [f"  {count:5d}  {message}" for message, count in r["messages"]]
        lines += [f"  traceback {count}x  {chain}" for chain, count in r["server log"]["chains"].items()]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    logs = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    logger.info("server logs: %s", logs)
    runs = []
    async with private_cluster(args.pg_bin) as (cluster, pg_ctl):
        for n in range(1, args.runs + 1):
            for mode in args.modes:
                logger.info("%s run %d", mode, n)
                runs.append(await one_run(cluster, pg_ctl, mode, n, args, logs))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
    parser.add_argument("--pg-bin", type=Path, default=Path(bindir), help="where initdb and pg_ctl are")
    parser.add_argument(
        "--modes", nargs="+", default=["fast", "immediate"], choices=["fast", "immediate", "none"]
    )
    parser.add_argument("--runs", type=int, default=2, help="runs of each mode")
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the load lasts")
    parser.add_argument("--seal-wait", type=float, default=3.0, help="when to count unsealed entries")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "restart.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    for name in ("httpx", "httpx2", "mcp"):  # a line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    runs = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"agents": args.agents, "seconds": args.seconds, "runs": runs}, indent=2) + "\n"
    )
    sys.stdout.write(table(runs) + "\n")


if __name__ == "__main__":
    main()
