"""Safe retries and safe concurrent edits: idempotency keys, task versions, bulk previews."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from mcp_server.config import AgentConfig, Settings
from mcp_server.db import Database
from tests.conftest import AGENT, call, call_error, connect, count_rows, snapshot
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio


async def setup_tasks(settings: Settings, era: str) -> dict[str, int]:
    async with connect(settings, era) as client:
        project = await make_project(client)
        task = await make_task(client, project)
        gone = await make_task(client, project, "gone")
        await call(client, "soft_delete_task", {"task_id": gone["id"]})
    return {"project": project, "task": task["id"], "gone": gone["id"]}


# Each writing tool: arguments for a first call, and what a different call with the same key changes.
WRITES: list[tuple[str, Any, dict[str, Any]]] = [
    ("create_task", lambda ids: {"title": "once", "project_id": ids["project"]}, {"title": "other"}),
    ("update_task", lambda ids: {"task_id": ids["task"], "status": "blocked"}, {"status": "completed"}),
    ("soft_delete_task", lambda ids: {"task_id": ids["task"]}, {"task_id": 424242}),
    ("restore_task", lambda ids: {"task_id": ids["gone"]}, {"task_id": 424242}),
    (
        "bulk_update_status",
        lambda ids: {"status": "completed", "task_ids": [ids["task"]]},
        {"status": "cancelled"},
    ),
    ("create_project", lambda ids: {"name": "Once"}, {"name": "Other"}),
]


@pytest.mark.parametrize(("tool", "arguments", "change"), WRITES, ids=[tool for tool, _, _ in WRITES])
async def test_a_retry_with_the_same_key_returns_the_first_result_and_writes_nothing(
    settings: Settings, era: str, db: Database, tool: str, arguments: Any, change: dict[str, Any]
) -> None:
    ids = await setup_tasks(settings, era)
    keyed = {**arguments(ids), "idempotency_key": f"{tool}-1"}
    async with connect(settings, era) as client:
        first = await call(client, tool, keyed)
        after_first = await snapshot(db)
        for _ in range(3):
            assert await call(client, tool, keyed) == first
        assert await snapshot(db) == after_first
        message = await call_error(client, tool, {**keyed, **change})
        assert "already used" in message and "nothing was changed" in message
    assert await snapshot(db) == after_first


async def test_simultaneous_retries_with_one_key_write_once(
    settings: Settings, era: str, db: Database
) -> None:
    ids = await setup_tasks(settings, era)
    entries_before = await count_rows(db, "audit_entry")
    results: list[Any] = []

    async def attempt() -> None:
        async with connect(settings, era) as client:
            arguments = {"title": "exactly once", "project_id": ids["project"], "idempotency_key": "k"}
            results.append(await call(client, "create_task", arguments))

    async with anyio.create_task_group() as group:
        for _ in range(6):
            group.start_soon(attempt)
    assert len(results) == 6 and all(result == results[0] for result in results)
    async with db.engine.connect() as conn:
        made = (await conn.execute(text("SELECT count(*) FROM entity WHERE title = 'exactly once'"))).scalar()
    assert made == 1 and await count_rows(db, "audit_entry") == entries_before + 1


async def test_keys_survive_a_restart_belong_to_one_agent_and_expire(
    settings: Settings, era: str, db: Database
) -> None:
    ids = await setup_tasks(settings, era)
    # A second task of this title is meant each time the key does not answer (test_duplicates.py
    # has the guard that would otherwise refuse it).
    arguments = {
        "title": "durable",
        "project_id": ids["project"],
        "idempotency_key": "restart",
        "allow_duplicate": True,
    }
    async with connect(settings, era) as client:
        first = await call(client, "create_task", arguments)
    async with connect(settings, era) as client:  # a new server: new engine, new process state
        assert await call(client, "create_task", arguments) == first
    async with connect(settings, era, name="another-agent") as other:
        assert (await call(other, "create_task", arguments))["id"] != first["id"]
    async with db.engine.begin() as conn:
        await conn.execute(text("UPDATE idempotency_key SET expires_at = created_at"))
    async with connect(settings, era) as client:
        assert (await call(client, "create_task", arguments))["id"] != first["id"]
    async with db.engine.connect() as conn:
        kept = (await conn.execute(text("SELECT agent_id FROM idempotency_key ORDER BY agent_id"))).scalars()
        assert list(kept) == [AGENT]  # expired records are purged when a key is next stored


async def test_an_update_naming_a_stale_version_is_a_conflict_that_carries_the_current_task(
    settings: Settings, era: str, db: Database
) -> None:
    ids = await setup_tasks(settings, era)
    async with connect(settings, era, name="alice") as alice, connect(settings, era, name="bob") as bob:
        read = await call(alice, "get_task", {"task_id": ids["task"]})
        changed = await call(bob, "update_task", {"task_id": ids["task"], "status": "blocked"})
        assert changed["version"] == read["version"] + 1
        before = await snapshot(db)
        message = await call_error(
            alice,
            "update_task",
            {"task_id": ids["task"], "status": "completed", "expected_version": read["version"]},
        )
        assert f"version {changed['version']}, not {read['version']}" in message
        current = json.loads(message[message.index("{") :])
        assert current["status"] == "blocked" and current["version"] == changed["version"]
        assert await snapshot(db) == before
        done = await call(
            alice,
            "update_task",
            {"task_id": ids["task"], "status": "completed", "expected_version": current["version"]},
        )
        assert done["status"] == "completed" and done["version"] == current["version"] + 1


async def test_a_bulk_dry_run_reports_what_would_change_and_changes_nothing(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client:
        project = await make_project(client)
        tasks = [await make_task(client, project, f"t{i}") for i in range(4)]
        await call(client, "update_task", {"task_id": tasks[0]["id"], "status": "blocked"})
    before = await snapshot(db)
    viewer = settings.model_copy(update={"agents": (AgentConfig(id="viewer", read_only=True),)})
    async with connect(viewer, era, name="viewer") as client:
        preview = await call(
            client,
            "bulk_update_status",
            {
                "status": "blocked",
                "filter": {"field": "project_id", "op": "eq", "value": project},
                "dry_run": True,
            },
        )
    assert preview["dry_run"] and "request_id" not in preview
    assert preview["changed_count"] == 3 and preview["changed_ids"] == [t["id"] for t in tasks[1:]]
    assert await snapshot(db) == before
