"""Undo: revert_request puts a call's task changes back from the audit log's before-values, as a new
audited change; a task changed since is left and reported, or, with atomic, nothing changes. Both
databases."""

from __future__ import annotations

from typing import Any

import pytest

from mcp_server.config import Settings
from mcp_server.db import Database
from tests.conftest import call, call_error, connect
from tests.test_permissions import entity_rows
from tests.test_project_changes import entries
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio


async def statuses(client: Any, ids: list[int]) -> list[str]:
    return [(await call(client, "get_task", {"task_id": task_id}))["status"] for task_id in ids]


async def test_reverting_a_bulk_update_restores_every_task_not_changed_since_and_reports_the_rest(
    settings: Settings, era: str, db: Database
) -> None:
    async with (
        connect(settings, era, name="runaway") as agent,
        connect(settings, era, name="careful") as other,
    ):
        project = await make_project(agent)
        ids = [(await make_task(agent, project, f"task {n}"))["id"] for n in range(5)]
        await call(agent, "update_task", {"task_id": ids[0], "status": "in_progress"})
        bulk = await call(agent, "bulk_update_status", {"status": "cancelled", "task_ids": ids})
        await call(other, "update_task", {"task_id": ids[4], "priority": "high"})  # changed since

        atomic = await call_error(other, "revert_request", {"request_id": bulk["request_id"], "atomic": True})
        assert f"task {ids[4]} cannot be reverted: it was updated again since, by careful" in atomic
        assert await statuses(agent, ids) == ["cancelled"] * 5  # atomic: nothing changed

        undone = await call(other, "revert_request", {"request_id": bulk["request_id"]})
        assert undone["reverted"] == ids[:4]
        assert [(item["task_id"], item["reason"].split(",")[0]) for item in undone["left"]] == [
            (ids[4], "it was updated again since")
        ]
        assert await statuses(agent, ids) == ["in_progress", "pending", "pending", "pending", "cancelled"]
        recorded = await entries(db, undone["request_id"])
        assert [(entity_id, action) for entity_id, action, _, _ in recorded] == [
            (i, "updated") for i in ids[:4]
        ]
        assert recorded[0][2:] == (
            {"status": "cancelled"},
            {"status": "in_progress", "reverts": bulk["request_id"]},
        )
        # A repeat finds every task changed since (by the revert itself) and changes nothing.
        before = await entity_rows(db)
        again = await call(other, "revert_request", {"request_id": bulk["request_id"]})
        assert again["reverted"] == [] and len(again["left"]) == 5
        assert await entity_rows(db) == before


async def test_reverting_creates_deletes_and_field_updates_puts_each_task_back(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client:
        first, second = await make_project(client, "First"), await make_project(client, "Second")
        made = await make_task(client, first, "made by mistake")
        kept = await make_task(client, first, "kept", priority="low")
        changes = {"task_id": kept["id"], "title": "renamed", "priority": "high", "project_id": second}
        await call(client, "update_task", changes)
        updates = await call(client, "get_audit_trail", {"entity_id": kept["id"], "action": "updated"})
        changed = updates["items"][0]
        await call(client, "revert_request", {"request_id": changed["request_id"]})
        back = await call(client, "get_task", {"task_id": kept["id"]})
        assert (back["title"], back["priority"], back["project"]) == (
            "kept",
            "low",
            {"id": first, "name": "First"},
        )
        deleted = await call(client, "bulk_delete_tasks", {"task_ids": [kept["id"]]})
        restored = await call(client, "revert_request", {"request_id": deleted["request_id"]})
        assert restored["reverted"] == [kept["id"]]
        # The title came back with its duplicate-guard key.
        assert "already has a live task" in await call_error(
            client, "create_task", {"title": "KEPT", "project_id": first}
        )

        created = await call(client, "get_audit_trail", {"entity_id": made["id"]})
        undo = await call(client, "revert_request", {"request_id": created["items"][-1]["request_id"]})
        assert undo["reverted"] == [made["id"]]
        assert "was deleted" in await call_error(client, "get_task", {"task_id": made["id"]})


async def test_what_has_no_before_value_is_left_and_an_unknown_request_is_an_error(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client:
        project = await make_project(client)
        task = await make_task(client, project)
        await call(client, "claim_task", {"task_id": task["id"]})
        trail = await call(client, "get_audit_trail", {"entity_id": task["id"], "action": "claimed"})
        undo = await call(client, "revert_request", {"request_id": trail["items"][0]["request_id"]})
        assert undo["reverted"] == [] and "a claimed entry has no before-value" in undo["left"][0]["reason"]
        missing = await call_error(client, "revert_request", {"request_id": "f" * 32})
        assert "no change was recorded under request" in missing


async def test_a_revert_never_starts_a_task_that_waits_for_unfinished_work(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client:
        project = await make_project(client)
        blocker, waiting = (
            (await make_task(client, project, "blocker"))["id"],
            (await make_task(client, project, "waiting"))["id"],
        )
        await call(client, "update_task", {"task_id": waiting, "status": "in_progress"})
        await call(client, "add_dependency", {"task_id": waiting, "blocked_by": blocker})
        set_aside = await call(client, "bulk_update_status", {"status": "blocked", "task_ids": [waiting]})
        undo = await call(client, "revert_request", {"request_id": set_aside["request_id"]})
        assert undo["reverted"] == []
        assert (
            f"would be in_progress while it waits for unfinished tasks ({blocker})"
            in undo["left"][0]["reason"]
        )
        assert (await call(client, "get_task", {"task_id": waiting}))["status"] == "blocked"


async def test_a_task_as_it_was_at_any_time_is_rebuilt_from_its_audit_trail(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client:
        project = await make_project(client)
        task = await make_task(client, project, "draft", priority="low")
        await call(client, "update_task", {"task_id": task["id"], "title": "final", "status": "in_progress"})
        await call(client, "claim_task", {"task_id": task["id"]})  # changes none of its fields
        await call(client, "bulk_delete_tasks", {"task_ids": [task["id"]]})
        trail = (await call(client, "get_audit_trail", {"entity_id": task["id"]}))["items"][::-1]
        created, updated, _, deleted = (entry["changed_at"] for entry in trail)

        def as_of(at: str) -> dict[str, Any]:
            return {"task_id": task["id"], "at": at}

        first = await call(client, "get_task_as_of", as_of(created))
        assert (first["title"], first["status"], first["priority"], first["deleted"]) == (
            "draft",
            "pending",
            "low",
            False,
        )
        assert first["last_change"]["action"] == "created"
        later = await call(client, "get_task_as_of", as_of(updated))
        assert (later["title"], later["status"], later["deleted"]) == ("final", "in_progress", False)
        gone = await call(client, "get_task_as_of", as_of(deleted))
        assert gone["deleted"] and gone["title"] == "final" and gone["last_change"]["action"] == "deleted"
        message = await call_error(client, "get_task_as_of", as_of("2020-01-01T00:00:00Z"))
        assert "has no recorded state at 2020-01-01T00:00:00.000000Z" in message
