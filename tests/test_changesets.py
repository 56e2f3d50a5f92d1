"""Changesets: a dry run's changeset applies exactly the tasks it showed, or nothing if any moved
since; an agent's approval policy holds its changes until an operator approves exactly what was
held (bound to its digest) or rejects it. Both databases."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from mcp_server import changesets
from mcp_server.config import AgentConfig, Settings
from mcp_server.db import Database
from mcp_server.errors import ConflictError
from tests.conftest import call, call_error, connect
from tests.test_permissions import entity_rows, refusals
from tests.test_project_changes import entries
from tests.test_reverts import statuses
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio

OPERATOR = "operator:alice"


def with_policy(settings: Settings, over_rows: int) -> Settings:
    agent = AgentConfig(id="careful", approval_over_rows=over_rows)
    return settings.model_copy(update={"agents": (agent,)})


async def decide(db: Database, changeset: dict[str, Any], *, approve: bool, digest: str | None = None) -> Any:
    async with db.session(write=True) as session:
        return await changesets.decide(
            session, OPERATOR, changeset["id"], digest or changeset["digest"], approve=approve
        )


async def test_a_preview_applies_exactly_the_tasks_it_showed_and_nothing_when_one_moved(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as agent, connect(settings, era, name="other") as other:
        project = await make_project(agent)
        ids = [(await make_task(agent, project, f"task {n}"))["id"] for n in range(4)]
        await call(agent, "update_task", {"task_id": ids[3], "status": "completed"})  # already there
        by_project = {"field": "project_id", "op": "eq", "value": project}
        asked = {"status": "completed", "filter": by_project}

        preview = await call(agent, "bulk_update_status", asked | {"dry_run": True})
        changeset = preview["changeset"]
        assert (preview["changed_count"], preview["changed_ids"]) == (3, ids[:3])
        assert (changeset["state"], changeset["task_count"]) == ("proposed", 3)
        shown = await call(agent, "get_changeset", {"changeset_id": changeset["id"]})
        assert [(i["task_id"], i["before"], i["after"]) for i in shown["items"]] == [
            (task_id, {"status": "pending"}, {"status": "completed"}) for task_id in ids[:3]
        ]
        assert shown["current"] is True and shown["digest"] == changeset["digest"]
        # Another agent's changeset is not this agent's to see or apply.
        assert "does not exist or is not yours" in await call_error(
            other, "apply_changeset", {"changeset_id": changeset["id"]}
        )

        # One task moves: the apply refuses, naming it, and nothing changes.
        await call(other, "update_task", {"task_id": ids[1], "priority": "high"})
        assert (await call(agent, "get_changeset", {"changeset_id": changeset["id"]}))["current"] is False
        before = await entity_rows(db)
        refused = await call_error(agent, "apply_changeset", {"changeset_id": changeset["id"]})
        assert f"out of date: its tasks changed since it was made (task {ids[1]} is at version 2, not 1)" in (
            refused
        )
        assert await entity_rows(db) == before

        # A new preview; a task that starts to match afterwards is not part of it.
        preview = await call(agent, "bulk_update_status", asked | {"dry_run": True})
        late = await make_task(agent, project, "came later")
        applied = await call(agent, "apply_changeset", {"changeset_id": preview["changeset"]["id"]})
        assert (applied["changed_count"], applied["changed_ids"]) == (3, ids[:3])
        assert applied["changeset"]["state"] == "applied"
        assert [row[:2] for row in await entries(db, applied["request_id"])] == [
            (task_id, "updated") for task_id in ids[:3]
        ]
        assert await statuses(agent, [*ids, late["id"]]) == ["completed"] * 4 + ["pending"]
        again = await call_error(agent, "apply_changeset", {"changeset_id": preview["changeset"]["id"]})
        assert f"was already applied (request {applied['request_id']})" in again


async def test_a_policy_holds_a_change_until_an_operator_approves_exactly_it_or_rejects_it(
    settings: Settings, era: str, db: Database
) -> None:
    held_settings = with_policy(settings, over_rows=2)
    async with connect(held_settings, era, name="careful") as agent, connect(settings, era) as other:
        project = await make_project(agent)
        ids = [(await make_task(agent, project, f"task {n}"))["id"] for n in range(5)]
        # Within the policy, a change is made at once.
        small = await call(agent, "bulk_update_status", {"status": "in_progress", "task_ids": ids[:2]})
        assert small["changed_count"] == 2 and "changeset" not in small

        # Over it, the change is held: nothing changes, and the hold is recorded.
        before = await entity_rows(db)
        held = await call(agent, "bulk_update_status", {"status": "cancelled", "task_ids": ids})
        changeset = held["changeset"]
        assert (held["changed_count"], changeset["state"], changeset["task_count"]) == (0, "pending", 5)
        assert await entity_rows(db) == before
        assert [row[1] for row in await entries(db, held["request_id"])] == ["held"]
        assert "waits for a person's approval" in await call_error(
            agent, "apply_changeset", {"changeset_id": changeset["id"]}
        )

        # A preview is no way around the policy: applying it holds it for a person.
        preview = await call(
            agent, "bulk_update_status", {"status": "blocked", "task_ids": ids, "dry_run": True}
        )
        applied = await call(agent, "apply_changeset", {"changeset_id": preview["changeset"]["id"]})
        assert (applied["changed_count"], applied["changeset"]["state"]) == (0, "pending")
        # Nor is a call that cannot wait for approval: it is refused, and the refusal recorded.
        refused = await call_error(agent, "delete_project", {"project_id": project, "live_tasks": "delete"})
        assert "would change 5 tasks" in refused and "approval_over_rows" in refused
        assert await entity_rows(db) == before
        assert await refusals(db) == [("careful", "delete_project", "approval_over_rows")]

        # Approval is bound to what the operator was shown.
        with pytest.raises(ConflictError, match="not the one you were shown"):
            await decide(db, changeset, approve=True, digest="0" * 64)
        decided = await decide(db, changeset, approve=True)
        request_id = decided.applied_request_id
        assert await statuses(agent, ids) == ["cancelled"] * 5
        recorded = await entries(db, request_id)
        assert sorted((row[:2] for row in recorded), key=str) == sorted(
            [(None, "approved")] + [(i, "updated") for i in ids], key=str
        )
        shown = await call(agent, "get_changeset", {"changeset_id": changeset["id"]})
        assert (shown["state"], shown["decided_by"], shown["applied_request_id"]) == (
            "applied",
            OPERATOR,
            request_id,
        )
        async with db.engine.connect() as conn:
            who = await conn.execute(
                text("SELECT action, changed_by FROM audit_entry WHERE request_id = :r"), {"r": request_id}
            )
            assert {tuple(row) for row in who.all()} == {("approved", OPERATOR), ("updated", "careful")}

        # Undo of the approved change puts every task back.
        undone = await call(other, "revert_request", {"request_id": request_id})
        assert undone["reverted"] == ids and undone["left"] == []
        assert await statuses(agent, ids) == ["in_progress"] * 2 + ["pending"] * 3

        # A held change whose task moves before approval: approving refuses and changes nothing.
        held = await call(agent, "bulk_delete_tasks", {"task_ids": ids[2:]})
        await call(other, "update_task", {"task_id": ids[4], "title": "renamed meanwhile"})
        before = await entity_rows(db)
        with pytest.raises(ConflictError, match=f"out of date.*task {ids[4]} is at version"):
            await decide(db, held["changeset"], approve=True)
        assert await entity_rows(db) == before
        # A rejected changeset never applies.
        await decide(db, held["changeset"], approve=False)
        with pytest.raises(ConflictError, match="rejected by operator:alice; it never applies"):
            await decide(db, held["changeset"], approve=True)
        assert await entity_rows(db) == before
        assert (await call(agent, "get_changeset", {"changeset_id": held["changeset"]["id"]}))[
            "state"
        ] == "rejected"


async def test_with_a_policy_of_zero_every_single_change_waits_for_approval(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(with_policy(settings, over_rows=0), era, name="careful") as agent:
        project = await make_project(agent)
        task = await make_task(agent, project, "needs a person")
        held = await call(
            agent, "update_task", {"task_id": task["id"], "title": "renamed", "priority": "high"}
        )
        assert (held["title"], held["changeset"]["state"]) == ("needs a person", "pending")
        shown = await call(agent, "get_changeset", {"changeset_id": held["changeset"]["id"]})
        assert shown["items"][0]["after"] == {"title": "renamed", "priority": "high"}
        await decide(db, held["changeset"], approve=True)
        now = await call(agent, "get_task", {"task_id": task["id"]})
        assert (now["title"], now["priority"]) == ("renamed", "high")

        deletion = await call(agent, "soft_delete_task", {"task_id": task["id"]})
        assert deletion["changeset"]["summary"] == "delete 1 task(s)"
        assert (await call(agent, "get_task", {"task_id": task["id"]}))["title"] == "renamed"
        await decide(db, deletion["changeset"], approve=True)
        assert "deleted" in await call_error(agent, "get_task", {"task_id": task["id"]})


async def test_a_held_change_is_checked_as_it_is_held_and_approved_within_the_agents_permissions(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as owner:
        inside, outside = await make_project(owner, "Inside"), await make_project(owner, "Outside")
        ids = [(await make_task(owner, inside, f"task {n}"))["id"] for n in range(5)]
    scoped = AgentConfig(id="careful", approval_over_rows=0, max_bulk_rows=3, projects=frozenset({inside}))
    held_settings = settings.model_copy(update={"agents": (scoped,)})
    async with connect(held_settings, era, name="careful") as agent:
        # What update_task would refuse is refused as it is held, not when a person approves it.
        moved = await call_error(agent, "update_task", {"task_id": ids[0], "project_id": outside})
        assert f"permission project:{outside} is missing" in moved
        too_many = await call_error(agent, "bulk_update_status", {"status": "completed", "task_ids": ids})
        assert "you may change at most 3" in too_many
        # A change of nothing is not held.
        same = await call(agent, "update_task", {"task_id": ids[0], "title": "task 0"})
        assert "changeset" not in same
        held = await call(agent, "bulk_update_status", {"status": "completed", "task_ids": ids[:3]})
        # What the changeset says of itself is part of its digest: altered, it is refused.
        async with db.engine.begin() as conn:
            await conn.execute(
                text("UPDATE changeset SET summary = 'harmless', task_count = 1 WHERE id = :id"),
                {"id": held["changeset"]["id"]},
            )
        before = await entity_rows(db)
        with pytest.raises(ConflictError, match="no longer matches its digest"):
            await decide(db, held["changeset"], approve=True)
        assert await entity_rows(db) == before
