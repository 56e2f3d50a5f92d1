"""Bulk soft delete, and deleting, restoring and renaming projects: set-based, each task's change
audited under the call's request id, with a dry run, the same permission checks, and a project
with live tasks deleted only when the caller says what happens to them. Both databases."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mcp import Client
from sqlalchemy import text

from mcp_server.config import AgentConfig, Settings
from mcp_server.db import Database
from tests.conftest import call, call_error, connect
from tests.test_permissions import entity_rows
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio


async def entries(db: Database, request_id: str) -> list[tuple[Any, ...]]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(
            # By entity: a set-based statement writes its entries in no particular order.
            text(
                "SELECT entity_id, action, old_value, new_value FROM audit_entry "
                "WHERE request_id = :r ORDER BY entity_id"
            ),
            {"r": request_id},
        )
        return [(entity_id, action, _json(old), _json(new)) for entity_id, action, old, new in rows.all()]


def _json(value: Any) -> Any:
    """An audit value as read: JSON text on SQLite, already parsed from PostgreSQL's jsonb."""
    return json.loads(value) if isinstance(value, str) else value


async def tasks_of(client: Client, project_id: int, include_deleted: bool = False) -> list[dict[str, Any]]:
    in_project = {"field": "project_id", "op": "eq", "value": project_id}
    found = await call(
        client,
        "search_tasks",
        {
            "filter": in_project,
            "include_deleted": include_deleted,
            "order_by": [{"field": "id"}],
            "limit": 100,
        },
    )
    return list(found["items"])


async def test_bulk_delete_previews_then_deletes_every_match_with_an_entry_each_and_leaves_held_tasks(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client, connect(settings, era, name="holder") as holder:
        project = await make_project(client)
        ids = [(await make_task(client, project, f"old {n}"))["id"] for n in range(5)]
        keep = (await make_task(client, project, "keep me"))["id"]
        held = await call(holder, "claim_task", {"task_id": ids[0]})
        old = {"field": "title", "op": "contains", "value": "old"}
        preview = await call(client, "bulk_delete_tasks", {"filter": old, "dry_run": True})
        changeset = preview.pop("changeset")
        assert (changeset["state"], changeset["task_count"], changeset["summary"]) == (
            "proposed",
            4,
            "delete 4 task(s)",
        )
        assert preview == {
            "dry_run": True,
            "changed_count": 4,
            "changed_ids": ids[1:],
            "changed_ids_truncated": False,
        }
        before = await entity_rows(db)
        assert [task["id"] for task in await tasks_of(client, project)] == [*ids, keep]
        assert await entity_rows(db) == before  # the preview changed nothing
        done = await call(client, "bulk_delete_tasks", {"filter": old})
        assert done["changed_ids"] == ids[1:] and done["changed_count"] == 4
        assert [task["id"] for task in await tasks_of(client, project)] == [ids[0], keep]
        recorded = await entries(db, done["request_id"])
        assert [(entity_id, action) for entity_id, action, _, _ in recorded] == [
            (i, "deleted") for i in ids[1:]
        ]
        assert all(old == {"deleted_at": None} and set(new) == {"deleted_at"} for _, _, old, new in recorded)
        # A repeat deletes nothing more: the held task is still its holder's.
        assert (await call(client, "bulk_delete_tasks", {"filter": old}))["changed_count"] == 0
        assert (await call(client, "get_task", {"task_id": ids[0]}))["claim"] == held["claim"]
        # Each comes back alone, as any deleted task does.
        await call(client, "restore_task", {"task_id": ids[1]})
        assert ids[1] in [task["id"] for task in await tasks_of(client, project)]


async def test_bulk_delete_by_ids_is_all_or_nothing_and_bounded_by_max_bulk_rows(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client:
        project = await make_project(client)
        ids = [(await make_task(client, project, f"task {n}"))["id"] for n in range(3)]
        before = await entity_rows(db)
        missing = await call_error(client, "bulk_delete_tasks", {"task_ids": [*ids, 999_999]})
        assert "these tasks do not exist or are deleted: 999999" in missing
        assert "give either filter or task_ids" in await call_error(client, "bulk_delete_tasks", {})
    limited = settings.model_copy(update={"agents": (AgentConfig(id="small", max_bulk_rows=2),)})
    async with connect(limited, era, name="small") as small:
        message = await call_error(small, "bulk_delete_tasks", {"task_ids": ids})
        assert "would change 3 tasks" in message and "max_bulk_rows" in message
    assert await entity_rows(db) == before


async def test_a_project_with_live_tasks_is_deleted_only_when_told_what_happens_to_them(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client:
        project = await make_project(client, "Old")
        earlier = (await make_task(client, project, "deleted before"))["id"]
        await call(client, "soft_delete_task", {"task_id": earlier})
        ids = [(await make_task(client, project, f"task {n}"))["id"] for n in range(3)]
        before = await entity_rows(db)
        message = await call_error(client, "delete_project", {"project_id": project})
        assert f"project {project} has 3 live task(s)" in message and "live_tasks='delete'" in message
        assert "move_to" in await call_error(
            client, "delete_project", {"project_id": project, "live_tasks": "move"}
        )
        assert await entity_rows(db) == before

        deleted = await call(client, "delete_project", {"project_id": project, "live_tasks": "delete"})
        assert deleted["deleted"] and deleted["tasks"] == "deleted" and deleted["changed_count"] == 3
        assert (await call(client, "list_projects", {}))["items"] == []
        assert await tasks_of(client, project) == []
        recorded = await entries(db, deleted["request_id"])
        assert [(entity_id, action) for entity_id, action, _, _ in recorded] == [
            (project, "deleted"),
            *((i, "deleted") for i in ids),
        ]
        assert recorded[0][3]["tasks"] == "deleted"
        assert "does not exist or is deleted" in await call_error(
            client, "create_task", {"title": "late", "project_id": project}
        )
        # A repeat is answered, not refused.
        assert (await call(client, "delete_project", {"project_id": project}))["changed_count"] == 0

        restored = await call(client, "restore_project", {"project_id": project})
        assert not restored["deleted"] and restored["tasks"] == "restored" and restored["changed_count"] == 3
        # What its deletion deleted comes back; what was deleted before stays deleted.
        assert [task["id"] for task in await tasks_of(client, project)] == ids
        assert [(e, a) for e, a, _, _ in await entries(db, restored["request_id"])] == [
            (project, "restored"),
            *((i, "restored") for i in ids),
        ]


async def test_deleting_a_project_can_move_its_tasks_and_waits_for_other_agents_claims(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client, connect(settings, era, name="holder") as holder:
        old, new = await make_project(client, "Old"), await make_project(client, "New")
        ids = [(await make_task(client, old, f"task {n}"))["id"] for n in range(3)]
        held = await call(holder, "claim_task", {"task_id": ids[1]})
        message = await call_error(
            client, "delete_project", {"project_id": old, "live_tasks": "move", "move_to": new}
        )
        assert f"task {ids[1]} by holder" in message
        await call(
            holder, "release_claim", {"task_id": ids[1], "fencing_token": held["claim"]["fencing_token"]}
        )
        moved = await call(
            client, "delete_project", {"project_id": old, "live_tasks": "move", "move_to": new}
        )
        assert moved["tasks"] == "moved" and moved["changed_count"] == 3
        assert [task["id"] for task in await tasks_of(client, new)] == ids
        assert all(task["project"] == {"id": new, "name": "New"} for task in await tasks_of(client, new))
        recorded = await entries(db, moved["request_id"])
        assert recorded[1:] == [(i, "updated", {"project_id": old}, {"project_id": new}) for i in ids]
        # Restoring the project brings none of them back: they were moved, not deleted.
        assert (await call(client, "restore_project", {"project_id": old}))["changed_count"] == 0
        assert await tasks_of(client, old) == []


async def test_renaming_a_project_is_audited_and_names_stay_unique_among_live_projects(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client:
        first, second = await make_project(client, "First"), await make_project(client, "Second")
        renamed = await call(client, "rename_project", {"project_id": first, "name": "Primary"})
        assert renamed["project"]["name"] == "Primary"
        assert (await entries(db, renamed["request_id"]))[0][1:] == (
            "updated",
            {"name": "First"},
            {"name": "Primary"},
        )
        assert f"a live project is named 'Primary' (id {first})" in await call_error(
            client, "rename_project", {"project_id": second, "name": "Primary"}
        )
        # A deleted project's name is free to reuse; restoring it then waits for a rename.
        await call(client, "delete_project", {"project_id": second})
        await call(client, "rename_project", {"project_id": first, "name": "Second"})
        clash = await call_error(client, "restore_project", {"project_id": second})
        assert "a live project is named 'Second'" in clash
        await call(client, "rename_project", {"project_id": first, "name": "Primary"})
        assert not (await call(client, "restore_project", {"project_id": second}))["deleted"]


async def test_a_project_restore_brings_back_its_own_untouched_tasks_and_none_live_in_a_deleted_project(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client:
        old, other = await make_project(client, "Old"), await make_project(client, "Other")
        left_alone = (await make_task(client, old, "left alone"))["id"]
        wandered = (await make_task(client, old, "wandered"))["id"]
        deleted = await call(client, "delete_project", {"project_id": old, "live_tasks": "delete"})
        # A task of a deleted project stays deleted until its project is back.
        refused = await call_error(client, "restore_task", {"task_id": wandered})
        assert f"project {old}, which is deleted; restore_project" in refused
        undo = await call(client, "revert_request", {"request_id": deleted["request_id"]})
        assert undo["reverted"] == [] and {item["task_id"] for item in undo["left"]} == {
            left_alone,
            wandered,
            old,
        }
        assert all(
            "deleted (restore_project first)" in i["reason"] for i in undo["left"] if i["task_id"] != old
        )
        # Restored, moved elsewhere and deleted again by later calls: that task is not the
        # project's to bring back.
        await call(client, "restore_project", {"project_id": old})
        await call(client, "update_task", {"task_id": wandered, "project_id": other})
        await call(client, "delete_project", {"project_id": old, "live_tasks": "delete"})
        await call(client, "soft_delete_task", {"task_id": wandered})
        assert (await call(client, "restore_project", {"project_id": old}))["changed_count"] == 1
        assert [task["id"] for task in await tasks_of(client, old)] == [left_alone]
        assert await tasks_of(client, other) == []
