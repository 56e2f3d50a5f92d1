"""Load a benchmark database fast: the server's own schema, then the rows by COPY.

The data is a history replayed in memory: 5,000,000 audit entries ten seconds apart, each one
creating a task, changing its status or priority, or soft-deleting it, so every task's audit
trail replays to its row and the hash chain is the one the server's trigger would have written
(checked against the database's own hash function after loading). Task 1001, the first task of
project 1, has exactly `hot_entries` entries: get_audit_trail's worst realistic case.

The rows are loaded at schema version 0004, the last whose chain was sealed on insert, and then
migrated to this server's version, as an existing database would be: the log says how long the
migration took on this much data.

Secondary indexes are dropped for the load and rebuilt after it; the chain and foreign-key
triggers are off for the session that copies (session_replication_role = replica), which is
why this needs a superuser. A marker table records what was loaded, so a second run with the
same sizes does nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from mcp_server import schema
from mcp_server.chain import GENESIS, sqlite_entry_hash
from mcp_server.config import Settings
from mcp_server.db import create_database
from mcp_server.models import PRIORITY_RANK, Priority, TaskStatus

logger = logging.getLogger("bench.generate")

T0 = datetime(2025, 1, 1, tzinfo=UTC)
TICK = timedelta(seconds=10)
LOADER = "bench-loader"
# The last schema version that sealed each audit entry on insert: the rows below are written as it did.
LEGACY_REVISION = "0004"
BURST = 1000

VERBS = ["Fix", "Deploy", "Review", "Write", "Migrate", "Test", "Design", "Refactor", "Document", "Audit"]
NOUNS = [
    "login flow", "billing export", "search index", "release notes", "database backup",
    "payment gateway", "onboarding email", "API docs", "cache layer", "audit report",
    "mobile build", "error budget", "access review", "data pipeline", "status page",
]  # fmt: skip
STATUSES = [s.value for s in TaskStatus]
STATUS_WEIGHTS = [30, 25, 15, 25, 5]
PRIORITIES = [p.value for p in Priority]
PRIORITY_WEIGHTS = [25, 40, 25, 10]


@dataclass(frozen=True)
class Size:
    projects: int
    tasks: int
    entries: int
    hot_entries: int

    @property
    def marker(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


SIZES = {
    "full": Size(projects=1000, tasks=1_000_000, entries=5_000_000, hot_entries=1000),
    "sqlite": Size(projects=100, tasks=100_000, entries=500_000, hot_entries=1000),
    "small": Size(projects=20, tasks=20_000, entries=100_000, hot_entries=1000),
}


@dataclass
class History:
    """The final state of every task and the audit entries that led to it, in chain order."""

    size: Size
    first_task: int
    title: list[str]
    project: list[int]
    status: list[str]
    priority: list[str]
    created: list[int]  # tick of creation
    updated: list[int]  # tick of the last change
    deleted: list[int]  # tick of deletion, 0 when live
    version: list[int]
    entries: list[tuple[int, int, str, dict[str, Any] | None, dict[str, Any]]]
    # (tick, task index, action, old, new); the tick is also the entry's seq


def plan(size: Size, seed: int = 5) -> History:
    """Replay the history: tasks are created in id order, changes pick a random live task."""
    rng = random.Random(seed)
    n = size.tasks
    first = size.projects + 1
    h = History(
        size=size,
        first_task=first,
        title=[f"{rng.choice(VERBS)} {rng.choice(NOUNS)} #{i}" for i in range(n)],
        project=[1 + i % size.projects for i in range(n)],
        status=["pending"] * n,
        priority=rng.choices(PRIORITIES, PRIORITY_WEIGHTS, k=n),
        created=[0] * n,
        updated=[0] * n,
        deleted=[0] * n,
        version=[1] * n,
        entries=[],
    )
    changes = size.entries - n
    hot_ticks = set(rng.sample(range(changes), size.hot_entries - 1))
    # Creations spread evenly over the timeline; the hot task is created first.
    create_every = size.entries / n
    created_so_far = 0
    change_no = 0
    for tick in range(1, size.entries + 1):
        # A first burst of creations leaves the changes that follow plenty of tasks to pick from.
        if created_so_far < n and (created_so_far < BURST or tick >= created_so_far * create_every):
            i = created_so_far
            created_so_far += 1
            h.created[i] = h.updated[i] = tick
            h.entries.append((tick, i, "created", None, _snapshot(h, i)))
            continue
        if change_no in hot_ticks:
            i = 0
        else:
            i = rng.randrange(created_so_far)
            while h.deleted[i] or i == 0:
                i = rng.randrange(created_so_far)
        change_no += 1
        h.updated[i] = tick
        h.version[i] += 1
        roll = rng.random()
        if roll < 0.0025 and i != 0:
            h.deleted[i] = tick
            h.entries.append((tick, i, "deleted", {"deleted_at": None}, {"deleted_at": _iso(tick)}))
        elif roll < 0.85:
            old = h.status[i]
            new = rng.choices(STATUSES, STATUS_WEIGHTS)[0]
            if new == old:
                new = STATUSES[(STATUSES.index(old) + 1) % len(STATUSES)]
            h.status[i] = new
            h.entries.append((tick, i, "updated", {"status": old}, {"status": new}))
        else:
            old = h.priority[i]
            new = PRIORITIES[(PRIORITIES.index(old) + rng.randrange(1, 4)) % 4]
            h.priority[i] = new
            h.entries.append((tick, i, "updated", {"priority": old}, {"priority": new}))
    return h


def _snapshot(h: History, i: int) -> dict[str, Any]:
    return {
        "title": h.title[i],
        "description": "",
        "status": h.status[i],
        "priority": h.priority[i],
        "project_id": h.project[i],
    }


def _at(tick: int) -> datetime:
    return T0 + tick * TICK


def _iso(tick: int) -> str:
    return _at(tick).isoformat()


def _request_id(tick: int) -> str:
    return f"{tick:032x}"


# --- PostgreSQL ------------------------------------------------------------------------------


def _jsonb_text(value: Any) -> str:
    """A value as PostgreSQL prints jsonb: keys ordered by length then bytes, ', ' and ': '."""
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return (
            "{"
            + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_jsonb_text(value[k])}" for k in keys)
            + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(_jsonb_text(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def pg_entry_hash(prev_hash: str, seq: int, entity_id: int, action: str, at: datetime, request_id: str,
                  old: dict[str, Any] | None, new: dict[str, Any]) -> str:  # fmt: skip
    """What chain.audit_entry_hash computes in PostgreSQL, for the rows this loader writes."""
    content = [
        seq,
        entity_id,
        "task",
        action,
        LOADER,
        None,
        at.strftime("%Y-%m-%dT%H:%M:%S"),
        request_id,
        old,
        new,
    ]
    return hashlib.sha256((prev_hash + _jsonb_text(content)).encode()).hexdigest()


def _pg_entities(h: History) -> Iterator[tuple[Any, ...]]:
    for p in range(1, h.size.projects + 1):
        at = T0
        yield (p, "project", f"Project {p:04d}", f"Benchmark project {p}", None, None, None, at, at, None, 1)
    for i in range(h.size.tasks):
        yield (
            h.first_task + i, "task", h.title[i], "", h.status[i], PRIORITY_RANK[Priority(h.priority[i])],
            h.project[i], _at(h.created[i]), _at(h.updated[i]), _at(h.deleted[i]) if h.deleted[i] else None,
            h.version[i],
        )  # fmt: skip


def _pg_entries(h: History) -> Iterator[tuple[Any, ...]]:
    prev = GENESIS
    for tick, i, action, old, new in h.entries:
        entity_id = h.first_task + i
        at = _at(tick)
        request_id = _request_id(tick)
        digest = pg_entry_hash(prev, tick, entity_id, action, at, request_id, old, new)
        yield (
            tick, tick, entity_id, "task", action, LOADER, None, at, request_id,
            None if old is None else json.dumps(old), json.dumps(new), prev, digest,
        )  # fmt: skip
        prev = digest


ENTITY_COLUMNS = [
    "id", "kind", "title", "description", "status", "priority", "project_id",
    "created_at", "updated_at", "deleted_at", "version",
]  # fmt: skip
ENTRY_COLUMNS = [
    "id", "seq", "entity_id", "entity_type", "action", "changed_by", "client_name", "changed_at",
    "request_id", "old_value", "new_value", "prev_hash", "entry_hash",
]  # fmt: skip


async def load_postgres(url: str, size: Size, *, force: bool) -> None:
    admin_url, name = url.rsplit("/", 1)
    admin = await asyncpg.connect(f"{admin_url}/postgres")
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists and not force and await _pg_marker(url) == size.marker:
            logger.info("%s already holds %s; nothing to load (--force reloads)", name, size.marker)
            await _migrate(url)  # data loaded by an earlier version: its schema may be behind
            return
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()

    await _migrate(url, LEGACY_REVISION)

    started = time.perf_counter()
    h = plan(size)
    logger.info(
        "planned %d tasks and %d entries in %.1f s", size.tasks, len(h.entries), time.perf_counter() - started
    )
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET session_replication_role = replica")
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename IN ('entity', 'audit_entry') AND indexname NOT LIKE '%pkey'"
        )
        for row in indexes:
            await conn.execute(f'DROP INDEX "{row["indexname"]}"')
        step = time.perf_counter()
        await conn.copy_records_to_table("entity", records=_pg_entities(h), columns=ENTITY_COLUMNS)
        logger.info("copied %d entities in %.1f s", size.projects + size.tasks, time.perf_counter() - step)
        step = time.perf_counter()
        await conn.copy_records_to_table("audit_entry", records=_pg_entries(h), columns=ENTRY_COLUMNS)
        logger.info("copied %d audit entries in %.1f s", len(h.entries), time.perf_counter() - step)
        step = time.perf_counter()
        await conn.execute("SET maintenance_work_mem = '512MB'")
        for row in indexes:
            await conn.execute(row["indexdef"])
        logger.info("rebuilt %d indexes in %.1f s", len(indexes), time.perf_counter() - step)
        await conn.execute("SELECT setval('entity_id_seq', (SELECT max(id) FROM entity))")
        await conn.execute("SELECT setval('audit_entry_id_seq', (SELECT max(id) FROM audit_entry))")
        await conn.execute("VACUUM (ANALYZE) entity")
        await conn.execute("VACUUM (ANALYZE) audit_entry")
        # The loader's hashes must be the database's: check both ends of the chain with its own function.
        wrong = await conn.fetchval(
            "SELECT count(*) FROM audit_entry a WHERE (seq <= 2000 OR seq > $1) AND audit_entry_hash(a) <> entry_hash",
            len(h.entries) - 2000,
        )
        if wrong:
            raise SystemExit(f"{wrong} loaded entries do not match the database's hash; the loader is wrong")
    finally:
        await conn.close()
    step = time.perf_counter()
    await _migrate(url)
    logger.info(
        "migrated the loaded data to schema version %s in %.2f s", schema.head(), time.perf_counter() - step
    )
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE bench_marker (size text NOT NULL)")
        await conn.execute("INSERT INTO bench_marker VALUES ($1)", size.marker)
    finally:
        await conn.close()
    logger.info("loaded %s in %.1f s", name, time.perf_counter() - started)


async def _migrate(url: str, target: str = "head") -> None:
    db = create_database(Settings(database_url=url))
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(lambda sync: schema.upgrade(sync, target))
    finally:
        await db.dispose()


async def _pg_marker(url: str) -> str | None:
    conn = await asyncpg.connect(url)
    try:
        return (
            await conn.fetchval("SELECT size FROM bench_marker")
            if await conn.fetchval("SELECT to_regclass('bench_marker') IS NOT NULL")
            else None
        )
    finally:
        await conn.close()


# --- SQLite ----------------------------------------------------------------------------------


def _sqlite_time(dt: datetime) -> str:
    return dt.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


async def load_sqlite(path: str, size: Size, *, force: bool) -> None:
    import os

    if os.path.exists(path) and not force:
        with sqlite3.connect(path) as check:
            found = check.execute("SELECT name FROM sqlite_master WHERE name = 'bench_marker'").fetchone()
            if found and check.execute("SELECT size FROM bench_marker").fetchone()[0] == size.marker:
                logger.info("%s already holds %s; nothing to do (--force reloads)", path, size.marker)
                return
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    await _migrate(f"sqlite:///{path}", LEGACY_REVISION)

    started = time.perf_counter()
    h = plan(size)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        # The chain's seal is a trigger; the loader seals rows itself, exactly as the trigger would.
        triggers = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        ).fetchall()
        for name, _ in triggers:
            conn.execute(f'DROP TRIGGER "{name}"')
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        conn.execute("BEGIN")
        marks = ",".join("?" * len(ENTITY_COLUMNS))
        conn.executemany(
            f"INSERT INTO entity ({','.join(ENTITY_COLUMNS)}) VALUES ({marks})",
            (
                tuple(_sqlite_time(v) if isinstance(v, datetime) else v for v in row)
                for row in _pg_entities(h)
            ),
        )
        marks = ",".join("?" * len(ENTRY_COLUMNS))
        conn.executemany(
            f"INSERT INTO audit_entry ({','.join(ENTRY_COLUMNS)}) VALUES ({marks})", _sqlite_entries(h)
        )
        conn.execute("COMMIT")
        for _, sql in indexes + triggers:
            conn.execute(sql)
        conn.execute("ANALYZE")
    finally:
        conn.close()
    step = time.perf_counter()
    await _migrate(f"sqlite:///{path}")
    logger.info(
        "migrated the loaded data to schema version %s in %.2f s", schema.head(), time.perf_counter() - step
    )
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("CREATE TABLE bench_marker (size TEXT NOT NULL)")
        conn.execute("INSERT INTO bench_marker VALUES (?)", (size.marker,))
    finally:
        conn.close()
    logger.info("loaded %s in %.1f s", path, time.perf_counter() - started)


def _sqlite_entries(h: History) -> Iterator[tuple[Any, ...]]:
    prev = GENESIS
    for tick, i, action, old, new in h.entries:
        entity_id = h.first_task + i
        at = _sqlite_time(_at(tick))
        request_id = _request_id(tick)
        old_text = None if old is None else json.dumps(old)
        new_text = json.dumps(new)
        digest = sqlite_entry_hash(
            prev, tick, entity_id, "task", action, LOADER, None, at, request_id, old_text, new_text
        )
        yield (
            tick,
            tick,
            entity_id,
            "task",
            action,
            LOADER,
            None,
            at,
            request_id,
            old_text,
            new_text,
            prev,
            digest,
        )
        prev = digest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgres", metavar="URL", help="load this PostgreSQL database (created if missing)"
    )
    parser.add_argument("--sqlite", metavar="PATH", help="load this SQLite file")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--force", action="store_true", help="reload even if the data is already there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if args.postgres:
        asyncio.run(load_postgres(args.postgres, SIZES[args.size], force=args.force))
    if args.sqlite:
        asyncio.run(load_sqlite(args.sqlite, SIZES[args.size], force=args.force))


if __name__ == "__main__":
    main()
