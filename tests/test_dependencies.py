"""Dependencies: a task waits for the tasks that block it; on both databases, through the protocol."""

from __future__ import annotations

import pytest

from mcp_server.config import Settings
from mcp_server.db import Database
from tests.conftest import call, call_error, connect
from tests.test_claims import audit_actions, make_tasks

pytestmark = pytest.mark.anyio


async def test_a_task_waits_for_its_blockers_and_finishing_them_reports_what_it_freed(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era, "planner") as planner:
        design, build, test, ship = await make_tasks(
            planner, {"title": "design"}, {"title": "build"}, {"title": "test"}, {"title": "ship"}
        )
        await call(planner, "add_dependency", {"task_id": build, "blocked_by": design})
        await call(planner, "add_dependency", {"task_id": ship, "blocked_by": build})
        shown = await call(planner, "add_dependency", {"task_id": ship, "blocked_by": test})
        assert [b["id"] for b in shown["blocked_by"]] == [build, test]
        again = await call(planner, "add_dependency", {"task_id": ship, "blocked_by": test})
        assert again["version"] == shown["version"]  # a repeat changes nothing

        message = await call_error(planner, "update_task", {"task_id": ship, "status": "completed"})
        assert "cannot be completed yet" in message and "'build' (pending)" in message and "'test'" in message
        message = await call_error(planner, "update_task", {"task_id": build, "status": "in_progress"})
        assert f"{design} 'design' (pending)" in message
        # Other changes go on: a blocked task may be renamed, reprioritized or set aside.
        await call(planner, "update_task", {"task_id": ship, "priority": "high", "status": "blocked"})

        done = await call(planner, "update_task", {"task_id": design, "status": "completed"})
        assert done["unblocked"] == [build]
        built = await call(planner, "update_task", {"task_id": build, "status": "completed"})
        assert built["unblocked"] == []  # ship still waits for test
        cancelled = await call(planner, "update_task", {"task_id": test, "status": "cancelled"})
        assert cancelled["unblocked"] == [ship]  # cancelled work holds nothing back either
        assert (await call(planner, "update_task", {"task_id": ship, "status": "completed"}))[
            "status"
        ] == "completed"

        got = await call(planner, "get_task", {"task_id": ship})
        assert [(b["id"], b["status"]) for b in got["blocked_by"]] == [
            (build, "completed"),
            (test, "cancelled"),
        ]
        removed = await call(planner, "remove_dependency", {"task_id": ship, "blocked_by": test})
        assert [b["id"] for b in removed["blocked_by"]] == [build]
    assert await audit_actions(db, ship) == [("planner", "created")] + [("planner", "updated")] * 5


async def test_a_dependency_that_would_close_a_cycle_is_refused_naming_it(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era, "planner") as planner:
        a, b, c = await make_tasks(planner, {"title": "a"}, {"title": "b"}, {"title": "c"})
        await call(planner, "add_dependency", {"task_id": a, "blocked_by": b})
        await call(planner, "add_dependency", {"task_id": b, "blocked_by": c})
        message = await call_error(planner, "add_dependency", {"task_id": c, "blocked_by": a})
        assert f"{c} → {a} → {b} → {c}" in message and "nothing was changed" in message
        message = await call_error(planner, "add_dependency", {"task_id": a, "blocked_by": a})
        assert "cannot wait for itself" in message
        message = await call_error(planner, "add_dependency", {"task_id": a, "blocked_by": 999_999})
        assert "task 999999 does not exist" in message
    assert await audit_actions(db, c) == [("planner", "created")]


async def test_ready_means_unclaimed_unfinished_and_waiting_for_nothing_for_search_bulk_and_claims(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era, "planner") as planner, connect(settings, era, "worker") as worker:
        first, second, free, held = await make_tasks(
            planner, {"title": "first"}, {"title": "second"}, {"title": "free"}, {"title": "held"}
        )
        await call(planner, "add_dependency", {"task_id": second, "blocked_by": first})
        await call(worker, "claim_task", {"task_id": held})

        ready = {"field": "ready", "op": "eq", "value": True}
        found = await call(planner, "search_tasks", {"filter": ready, "order_by": [{"field": "id"}]})
        assert [item["id"] for item in found["items"]] == [first, free]
        not_ready = {"field": "ready", "op": "eq", "value": False}
        found = await call(planner, "search_tasks", {"filter": not_ready, "order_by": [{"field": "id"}]})
        assert [item["id"] for item in found["items"]] == [second, held]
        message = await call_error(
            planner, "search_tasks", {"filter": {"field": "ready", "op": "eq", "value": "yes"}}
        )
        assert "expected true or false" in message

        message = await call_error(worker, "claim_task", {"task_id": second})
        assert f"waits for unfinished tasks ({first})" in message
        # The claim's own filter may say ready too (it judges claims by the same clock).
        taken = [(await call(worker, "claim_task", {"filter": ready}))["id"] for _ in range(2)]
        assert sorted(taken) == [first, free]  # never the waiting one
        assert "no task is free" in await call_error(worker, "claim_task", {})

        started = await call(
            planner, "bulk_update_status", {"status": "in_progress", "task_ids": [second, free]}
        )
        assert started["changed_ids"] == []  # the waiting task stays; the free one is held by worker
        await call(
            planner, "bulk_update_status", {"status": "blocked", "task_ids": [second]}
        )  # setting aside is fine
