"""The audit log cannot be rewritten quietly: the database refuses edits, and the hash chain shows them;
writers share no lock, and the sealer links what they commit into one chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from mcp_server.config import Settings
from mcp_server.db import Database, create_database
from tests.conftest import APP_ROLE, as_app_role, call, call_error, connect, seal_all, snapshot
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio


async def some_history(settings: Settings, era: str = "auto") -> list[int]:
    async with connect(settings, era) as client:
        project = await make_project(client)
        ids = [(await make_task(client, project, f"t{i}"))["id"] for i in range(3)]
        await call(client, "bulk_update_status", {"status": "blocked", "task_ids": ids})
        await call(client, "soft_delete_task", {"task_id": ids[0]})
    return ids


AUDIT_TABLES = ("audit_entry", "audit_seal", "audit_checkpoint")


@asynccontextmanager
async def triggers_off(db: Database) -> AsyncIterator[None]:
    """What a database superuser can do: switch the append-only triggers off, then edit."""
    async with db.engine.begin() as conn:
        if db.is_sqlite:
            for table in AUDIT_TABLES:
                for operation in ("update", "delete"):
                    await conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{operation}"))
        else:
            for table in AUDIT_TABLES:
                await conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
    try:
        yield
    finally:
        if not db.is_sqlite:
            async with db.engine.begin() as conn:
                for table in AUDIT_TABLES:
                    await conn.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))


def verify_cli(database_url: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_server", "verify-audit-log", *arguments],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_database_itself_refuses_to_update_delete_or_truncate_audit_rows(
    settings: Settings, db: Database
) -> None:
    await some_history(settings)
    await seal_all(settings, db)
    before = await snapshot(db)
    statements = [
        "UPDATE audit_entry SET changed_by = 'someone else'",
        "DELETE FROM audit_entry WHERE id = 1",
        "UPDATE audit_seal SET prev_hash = entry_hash",
        "DELETE FROM audit_seal WHERE seq = 8",
    ]
    if not db.is_sqlite:
        statements += ["TRUNCATE audit_entry CASCADE", "TRUNCATE audit_seal"]
    for statement in statements:
        with pytest.raises(DBAPIError, match="append-only"):
            async with db.engine.begin() as conn:
                await conn.execute(text(statement))
    assert await snapshot(db) == before


@pytest.mark.parametrize(
    ("tampering", "seq", "checked", "finding"),
    [
        ("UPDATE audit_entry SET changed_by = 'innocent' WHERE id = 3", 3, 2, "content does not match"),
        ("UPDATE audit_entry SET new_value = NULL WHERE id = 5", 5, 4, "content does not match"),
        (
            "DELETE FROM audit_seal WHERE seq = 2; DELETE FROM audit_entry WHERE id = 2",
            3,
            1,
            "entry 2 is missing",
        ),
        ("UPDATE audit_seal SET prev_hash = entry_hash WHERE seq = 4", 4, 3, "does not link"),
    ],
)
async def test_verify_audit_log_finds_the_first_entry_changed_behind_the_servers_back(
    settings: Settings, db: Database, database_url: str, tampering: str, seq: int, checked: int, finding: str
) -> None:
    await some_history(settings)
    clean = verify_cli(database_url, "--wait", "30")  # no server runs: it seals them itself
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["entries_checked"] == 8
    async with triggers_off(db), db.engine.begin() as conn:
        for statement in tampering.split("; "):
            await conn.execute(text(statement))
    async with connect(settings, "auto") as client:
        report = await call(client, "verify_audit_log")
    assert not report["ok"]
    assert report["first_problem"]["seq"] == seq and finding in report["first_problem"]["problem"]
    assert report["entries_checked"] == checked
    found = verify_cli(database_url)
    assert found.returncode == 1 and f"seq={seq}" in found.stderr


async def test_an_entry_inserted_with_the_stamp_off_is_outside_the_chain(
    settings: Settings, db: Database
) -> None:
    await some_history(settings)
    async with db.engine.begin() as conn:
        if db.is_sqlite:
            await conn.execute(text("DROP TRIGGER audit_entry_stamp"))
        else:
            await conn.execute(text("ALTER TABLE audit_entry DISABLE TRIGGER audit_entry_stamp"))
        await conn.execute(
            text(
                "INSERT INTO audit_entry (action, changed_by, changed_at, request_id) "
                "VALUES ('created', 'forger', CURRENT_TIMESTAMP, 'forged')"
            )
        )
        if not db.is_sqlite:  # the schema outlives this test on PostgreSQL
            await conn.execute(text("ALTER TABLE audit_entry ENABLE TRIGGER audit_entry_stamp"))
    await seal_all(settings, db)
    async with connect(settings, "auto") as client:
        report = await call(client, "verify_audit_log")
    assert not report["ok"] and "outside the chain" in report["first_problem"]["problem"]
    assert report["first_problem"]["id"] == 9 and report["entries_checked"] == 8


async def test_one_calls_changes_are_found_together_by_its_request_id(settings: Settings, era: str) -> None:
    async with connect(settings, era) as client:
        project = await make_project(client)
        ids = [(await make_task(client, project, f"t{i}"))["id"] for i in range(4)]
        result = await call(client, "bulk_update_status", {"status": "completed", "task_ids": ids})
        unit = await call(client, "get_audit_trail", {"request_id": result["request_id"]})
        assert sorted(entry["entity_id"] for entry in unit["items"]) == ids
        assert {entry["request_id"] for entry in unit["items"]} == {result["request_id"]}
        assert "entity" not in unit  # only a trail of one entity has it
        everything = await call(client, "get_audit_trail", {"limit": 100})
        assert len(everything["items"]) == 1 + 4 + 4


async def test_on_postgresql_the_app_role_cannot_touch_audit_rows_even_without_the_triggers(
    settings: Settings, db: Database, database_url: str, era: str
) -> None:
    if db.is_sqlite:
        pytest.skip("database roles are a PostgreSQL feature; on SQLite the file's permissions decide")
    as_app = await as_app_role(db, database_url)
    app_settings = settings.model_copy(update={"database_url": as_app})
    checked = await anyio.run_process(
        [sys.executable, "-m", "mcp_server", "doctor", "--json"],
        env={**os.environ, "DATABASE_URL": as_app},
        check=False,
    )
    assert checked.returncode == 0, checked.stdout.decode()
    [role] = [f for f in json.loads(checked.stdout)["findings"] if f["check"] == "database role"]
    assert role == {**role, "level": "ok", "text": f"{APP_ROLE} may only read and append to the audit log"}
    ids = await some_history(app_settings, era)
    async with connect(app_settings, era) as client:
        await call(client, "restore_task", {"task_id": ids[0]})
        await seal_all(app_settings, db)  # the sealer runs as the role too
        report = await call(client, "verify_audit_log")
        assert report["ok"] and report["entries_checked"] == 9 and report["unsealed"] == 0
    app_db = create_database(app_settings)
    try:
        async with triggers_off(db):  # even with the triggers off, the role's own rights refuse
            for statement in (
                "UPDATE audit_entry SET changed_by = 'x'",
                "DELETE FROM audit_entry",
                "TRUNCATE audit_entry CASCADE",
                "UPDATE audit_seal SET prev_hash = entry_hash",
                "DELETE FROM audit_seal",
                "DELETE FROM audit_checkpoint",
                "DELETE FROM audit_chain",
                "DELETE FROM entity",
            ):
                with pytest.raises(DBAPIError, match="permission denied"):
                    async with app_db.engine.begin() as conn:
                        await conn.execute(text(statement))
    finally:
        await app_db.dispose()


async def test_on_postgresql_a_held_lock_or_a_long_statement_ends_the_call_with_a_clear_error(
    settings: Settings, db: Database, era: str
) -> None:
    if db.is_sqlite:
        pytest.skip("statement and lock timeouts are PostgreSQL settings; SQLite waits on its busy timeout")
    async with connect(settings, era) as client:
        await make_project(client)
    before = await snapshot(db)
    cases = [
        ({"lock_timeout_ms": 200}, "busy"),
        ({"lock_timeout_ms": 0, "statement_timeout_ms": 300}, "ran longer than the database allows"),
    ]
    async with db.engine.connect() as holder:
        # Another writer, mid-transaction, creating a project of the same name: the unique index
        # makes this insert wait for it to end.
        await holder.execute(
            text(
                "INSERT INTO entity (kind, title, description, created_at, updated_at) "
                "VALUES ('project', 'Blocked', '', now(), now())"
            )
        )
        try:
            for limits, expected in cases:
                async with connect(settings.model_copy(update=limits), era) as client:
                    message = await call_error(client, "create_project", {"name": "Blocked"})
                    assert expected in message and "nothing was changed" in message
                    assert (await call(client, "list_projects", {}))["items"]
        finally:
            await holder.rollback()
    assert await snapshot(db) == before


async def test_writers_that_bypass_the_server_wait_for_no_one_and_are_sealed_into_one_chain(
    settings: Settings, db: Database
) -> None:
    """Writers hold no shared lock: two open transactions insert audit rows side by side, and the
    sealer links every committed row exactly once, in the order it sees them commit, never
    passing over one still in flight."""
    await some_history(settings)
    insert = text(
        "INSERT INTO audit_entry (action, changed_by, changed_at, request_id) "
        "VALUES ('refused', :by, CURRENT_TIMESTAMP, :request)"
    )
    if not db.is_sqlite:  # SQLite has one writer at a time by design
        async with db.engine.connect() as first, db.engine.connect() as second:
            await first.execute(insert, {"by": "first", "request": "a"})
            with anyio.fail_after(2):  # would wait for `first` to commit if writers shared a lock
                await second.execute(insert, {"by": "second", "request": "b"})
            await second.commit()
            await seal_all(settings, db)  # seals `second`'s row; `first`'s is still in flight
            await first.commit()

    async def writer(n: int) -> None:
        for i in range(25):
            async with db.engine.begin() as conn:
                await conn.execute(insert, {"by": f"writer-{n}", "request": f"{n}-{i}"})

    async with anyio.create_task_group() as group:
        for n in range(4):
            group.start_soon(writer, n)
    await seal_all(settings, db)
    async with db.engine.connect() as conn:
        sealed = (await conn.execute(text("SELECT seq, entry_id FROM audit_seal ORDER BY seq"))).all()
        entries = (await conn.execute(text("SELECT id FROM audit_entry ORDER BY id"))).scalars().all()
    assert [row.seq for row in sealed] == list(range(1, len(entries) + 1))
    assert sorted(row.entry_id for row in sealed) == entries
    if not db.is_sqlite:
        # `second` committed first, so it was sealed first although `first` began first.
        by_request = dict(await db_rows(db, "SELECT request_id, id FROM audit_entry"))
        position = {row.entry_id: row.seq for row in sealed}
        assert position[by_request["b"]] < position[by_request["a"]]
    async with connect(settings, "auto") as client:
        report = await call(client, "verify_audit_log")
    assert report["ok"] and report["entries_checked"] == len(entries) and report["unsealed"] == 0


async def db_rows(db: Database, query: str) -> list[tuple[object, ...]]:
    async with db.engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(text(query))]


async def test_an_agent_verifies_the_log_at_most_once_an_interval_and_is_told_when_to_retry(
    settings: Settings, era: str, db: Database
) -> None:
    limited = settings.model_copy(update={"verify_interval_seconds": 3600})
    async with connect(limited, era) as client:
        assert (await call(client, "verify_audit_log"))["ok"]
        refused = await call_error(client, "verify_audit_log", {})
        assert "at most once every 3600 s for each agent" in refused and "retry in" in refused


async def test_a_verification_walks_on_from_where_the_last_ended_and_the_whole_chain_when_due(
    settings: Settings, era: str, db: Database
) -> None:
    """The first verification in a process walks the whole chain; the next only what was sealed
    since, from the position the first ended at, which must still be there as it was. A change to
    an older entry is found by the next whole walk (every verify_full_interval_seconds)."""
    incremental = settings.model_copy(update={"verify_full_interval_seconds": 3600})
    async with connect(incremental, era) as client:
        project = await make_project(client)
        await make_task(client, project)
        await seal_all(settings, db)
        first = await call(client, "verify_audit_log")
        assert first["ok"] and first["entries_checked"] == first["head_seq"] == 2 and "from_seq" not in first
        await make_task(client, project, "another")
        await seal_all(settings, db)
        second = await call(client, "verify_audit_log")
        assert second["ok"] and second["from_seq"] == 2 and second["entries_checked"] == 1
        assert second["head_seq"] == 3
        # An older entry changed behind the triggers: not read again until a whole walk is due.
        async with triggers_off(db), db.engine.begin() as conn:
            await conn.execute(text("UPDATE audit_entry SET changed_by = 'someone else' WHERE id = 1"))
        assert (await call(client, "verify_audit_log"))["ok"]
        # The newest entries removed, back past where the last walk ended: found at once.
        async with triggers_off(db), db.engine.begin() as conn:
            await conn.execute(text("DELETE FROM audit_seal WHERE seq = 3"))
        removed = await call(client, "verify_audit_log")
        assert (
            not removed["ok"]
            and "an earlier verification ended at has" in removed["first_problem"]["problem"]
        )
    async with connect(settings, era) as client:  # a whole walk, as every process's first is
        whole = await call(client, "verify_audit_log")
        assert not whole["ok"] and whole["first_problem"]["seq"] == 1 and "from_seq" not in whole
