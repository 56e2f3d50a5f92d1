"""Schema migrations: a database made by an earlier release upgrades to this one without losing a
row, the models and the migrations agree, and a server never runs on a schema it does not match."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, text
from sqlmodel import SQLModel

from mcp_server import schema, titles
from mcp_server.auth import mint_token, token_sha256
from mcp_server.config import Settings
from mcp_server.db import Database, create_database
from mcp_server.errors import StartupError
from mcp_server.models import AUDIT_TABLE, ENTITY_TABLE, IdempotencyRecord
from tests.conftest import AGENT, call, connect, http_server, seal_all
from tests.test_tools import make_task

pytestmark = pytest.mark.anyio

INT32_MAX = 2**31 - 1
WHEN = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


async def at_version(url: str, target: str) -> Database:
    db = create_database(Settings(database_url=url))
    async with db.engine.begin() as conn:
        await conn.run_sync(lambda sync: schema.upgrade(sync, target))
    return db


async def version_of(db: Database) -> str | None:
    async with db.engine.connect() as conn:
        return await conn.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())


async def all_rows(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    tables = {"entity": "id", "audit_entry": "id", "idempotency_key": "agent_id, key"}
    async with db.engine.connect() as conn:
        return {
            table: [tuple(row) for row in (await conn.execute(text(f"SELECT * FROM {table} ORDER BY {key}")))]  # noqa: S608
            for table, key in tables.items()
        }


async def first_release_history(db: Database) -> None:
    """Rows as the first release wrote them: projects, live and deleted tasks, their audit entries
    (sealed by the first release's triggers), and a remembered idempotent result. The database
    numbers the rows: projects 1 and 2, then tasks 3 to 8."""
    async with db.engine.begin() as conn:
        for title in ["Apollo", "Gemini"]:
            values = {"kind": "project", "title": title, "created_at": WHEN, "updated_at": WHEN}
            await conn.execute(insert(ENTITY_TABLE).values(description="", version=1, **values))
        for n in range(3, 9):
            deleted = WHEN if n == 8 else None
            await conn.execute(
                insert(ENTITY_TABLE).values(
                    kind="task", title=f"task {n}", description="ünïcode ✓", status="pending",
                    priority="high" if n % 2 else "low", project_id=1 + n % 2, created_at=WHEN,
                    updated_at=WHEN, deleted_at=deleted, version=2 if deleted else 1,
                )
            )  # fmt: skip
        for n in range(1, 9):
            await conn.execute(
                insert(AUDIT_TABLE).values(
                    entity_id=n, entity_type="task" if n > 2 else "project", action="created",
                    changed_by=AGENT, client_name="first-release", changed_at=WHEN, request_id=f"r{n}",
                    old_value=None, new_value={"id": n, "title": f"#{n}"},
                )
            )  # fmt: skip
        await conn.execute(
            insert(IdempotencyRecord).values(
                agent_id=AGENT, key="k1", tool="create_task", fingerprint="f" * 64, result={"id": 3},
                created_at=WHEN, expires_at=datetime(2099, 1, 1, tzinfo=UTC),
            )
        )  # fmt: skip


def as_they_were(after: dict[str, list[tuple[Any, ...]]], before: dict[str, list[tuple[Any, ...]]]) -> Any:
    """The rows after an upgrade in the columns they had before it. Later migrations add columns
    at the end, empty in old rows (the audit entries' txid and row_hash, which entries sealed on
    insert leave empty)."""
    kept = {}
    for table, rows in after.items():
        width = len(before[table][0])
        if (
            table == "entity"
        ):  # but the title key, filled from each task's title (0011), project's name (0016)
            kinds, title_at = ENTITY_TABLE.c.keys().index("kind"), ENTITY_TABLE.c.keys().index("title")
            assert [row[-1] for row in rows] == [
                titles.key(row[title_at]) if row[kinds] == "task" else titles.name_key(row[title_at])
                for row in rows
            ]
            rows = [row[:-1] for row in rows]
        assert all(not any(row[width:]) for row in rows), f"{table}: an added column holds a value"
        kept[table] = [row[:width] for row in rows]
    return kept


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_server", *args],
        env={**os.environ, "DATABASE_URL": url, "MCP_AGENT_ID": AGENT},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_migrate_upgrades_a_first_release_database_to_head_and_keeps_every_row(
    empty_database_url: str,
) -> None:
    db = await at_version(empty_database_url, schema.FIRST)
    try:
        await first_release_history(db)
        before = await all_rows(db)
        migrated = await anyio.to_thread.run_sync(lambda: run_cli(empty_database_url, "migrate"))
        assert migrated.returncode == 0, migrated.stderr
        assert f"schema upgraded from {schema.FIRST} to {schema.head()}" in migrated.stderr
        assert schema.head() != schema.FIRST  # else this test would upgrade nothing
        # Statements prepared on the old column types are void now; a server starts afresh anyway.
        await db.engine.dispose()
        assert await version_of(db) == schema.head()
        assert as_they_were(await all_rows(db), before) == before
        again = await anyio.to_thread.run_sync(lambda: run_cli(empty_database_url, "migrate"))
        assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr

        settings = Settings(database_url=empty_database_url, agent_id=AGENT, verify_interval_seconds=0)
        async with connect(settings, "auto") as client:
            report = await call(client, "verify_audit_log")
            assert report["ok"] and report["entries_checked"] == 8, report
            page = await call(client, "search_tasks", {"order_by": [{"field": "id"}]})
            assert [task["id"] for task in page["items"]] == [3, 4, 5, 6, 7]
            assert page["items"][0]["project"] == {"id": 2, "name": "Gemini"}
            # The chain goes on from the first release's head.
            await make_task(client, 1, "after the upgrade")
            await seal_all(settings, db)
            # Walked on from the first release's head (an entry sealed on insert) to the new one.
            report = await call(client, "verify_audit_log")
            assert report["ok"] and report["from_seq"] == 8 and report["entries_checked"] == 1, report
            assert report["head_seq"] == 9
    finally:
        await db.dispose()


async def test_a_migration_is_not_cut_off_by_the_statement_timeout_meant_for_tool_calls(
    empty_database_url: str,
) -> None:
    """Rewriting a large table takes longer than a tool call may: on 200,000 tasks, 0002's ALTER
    takes well over the 50 ms this server's calls are given here."""
    if empty_database_url.startswith("sqlite"):
        pytest.skip("statement_timeout is a PostgreSQL setting")
    db = await at_version(empty_database_url, schema.FIRST)
    try:
        await first_release_history(db)
        async with db.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO entity (kind, title, description, status, priority, project_id, "
                    "created_at, updated_at, version) SELECT 'task', 'bulk ' || n, '', 'pending', 1, 1, "
                    "now(), now(), 1 FROM generate_series(1, 200000) AS n"
                )
            )
        migrated = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "mcp_server", "migrate"],
                env={**os.environ, "DATABASE_URL": empty_database_url, "DB_STATEMENT_TIMEOUT_MS": "50"},
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        )
        assert migrated.returncode == 0, migrated.stderr
        await db.engine.dispose()
        assert await version_of(db) == schema.head()
    finally:
        await db.dispose()


async def test_after_the_upgrade_ids_go_past_32_bits(empty_database_url: str) -> None:
    db = await at_version(empty_database_url, "head")
    try:
        async with db.engine.begin() as conn:
            project = {"kind": "project", "title": "Big", "created_at": WHEN, "updated_at": WHEN}
            await conn.execute(
                insert(ENTITY_TABLE).values(id=INT32_MAX, description="", version=1, **project)
            )
            await conn.execute(
                insert(AUDIT_TABLE).values(
                    id=INT32_MAX, entity_id=INT32_MAX, entity_type="project", action="created",
                    changed_by=AGENT, changed_at=WHEN, request_id="r1",
                )
            )  # fmt: skip
            if not db.is_sqlite:
                await conn.execute(text(f"SELECT setval('entity_id_seq', {INT32_MAX})"))
                await conn.execute(text(f"SELECT setval('audit_entry_id_seq', {INT32_MAX})"))
        settings = Settings(database_url=empty_database_url, agent_id=AGENT, verify_interval_seconds=0)
        async with connect(settings, "auto") as client:
            task = await make_task(client, INT32_MAX, "the 2,147,483,648th")
            assert task["id"] == INT32_MAX + 1
            got = await call(client, "get_task", {"task_id": task["id"]})
            assert got["project"]["id"] == INT32_MAX
            trail = await call(client, "get_audit_trail", {"entity_id": task["id"]})
            assert trail["items"][0]["id"] == INT32_MAX + 1
            assert (await call(client, "verify_audit_log"))["ok"]
    finally:
        await db.dispose()


async def test_the_models_and_the_migrations_agree(empty_database_url: str) -> None:
    db = await at_version(empty_database_url, "head")
    try:
        async with db.engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), SQLModel.metadata
                )
            )
        assert diff == []
    finally:
        await db.dispose()


async def test_a_server_refuses_a_postgresql_schema_behind_and_upgrades_its_own_sqlite_file(
    empty_database_url: str, tmp_path: Path
) -> None:
    db = await at_version(empty_database_url, schema.FIRST)
    agent = {"id": AGENT, "token_sha256": token_sha256(mint_token())}
    config = {"database_url": empty_database_url, "agents": [agent]}
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    try:
        if db.is_sqlite:
            with http_server(tmp_path, config):
                pass
            assert await version_of(db) == schema.head()
            return
        for args in (["serve"], ["serve", "--transport", "http", "--port", "0"]):
            refused = await anyio.to_thread.run_sync(
                lambda args=args: run_cli(empty_database_url, "--config", str(config_file), *args)
            )
            assert refused.returncode == 1, refused.stderr
            assert f"schema version {schema.FIRST}" in refused.stderr
            assert "run `mcp-task-server migrate`" in refused.stderr
            assert "Traceback" not in refused.stderr
        assert await version_of(db) == schema.FIRST
    finally:
        await db.dispose()


async def test_a_database_from_before_migrations_is_taken_as_the_first_release(
    empty_database_url: str,
) -> None:
    db = await at_version(empty_database_url, schema.FIRST)
    try:
        await first_release_history(db)
        async with db.engine.begin() as conn:
            await conn.execute(text("DROP TABLE alembic_version"))
        before = await all_rows(db)
        assert (await db.open_schema(upgrade=True)).current == schema.FIRST
        assert await version_of(db) == schema.head()
        assert as_they_were(await all_rows(db), before) == before
    finally:
        await db.dispose()


async def test_a_database_older_than_the_first_migration_is_refused(empty_database_url: str) -> None:
    db = create_database(Settings(database_url=empty_database_url))
    try:
        async with db.engine.begin() as conn:
            await conn.execute(text("CREATE TABLE entity (id INTEGER PRIMARY KEY, version INTEGER)"))
            await conn.execute(text("CREATE TABLE audit_entry (id INTEGER PRIMARY KEY, changed_by TEXT)"))
        for upgrade in (False, True):
            with pytest.raises(
                StartupError, match=r"older than any migration \(it lacks audit_entry.entry_hash"
            ):
                await db.open_schema(upgrade=upgrade)
    finally:
        await db.dispose()


async def test_a_database_upgraded_by_a_newer_server_is_refused(empty_database_url: str) -> None:
    db = await at_version(empty_database_url, "head")
    try:
        async with db.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        for upgrade in (False, True):
            with pytest.raises(StartupError, match="upgraded by a newer mcp-task-server"):
                await db.open_schema(upgrade=upgrade)
        assert await version_of(db) == "9999"
    finally:
        await db.dispose()


async def test_servers_starting_together_on_an_empty_database_build_its_schema_once(
    empty_database_url: str,
) -> None:
    databases = [create_database(Settings(database_url=empty_database_url)) for _ in range(3)]
    try:
        versions = await asyncio.gather(*(db.open_schema(upgrade=True) for db in databases))
        assert sorted(v.current or "" for v in versions) == ["", schema.head(), schema.head()]
        assert await version_of(databases[0]) == schema.head()
    finally:
        for db in databases:
            await db.dispose()
