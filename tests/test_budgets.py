"""Write budgets: over its budget an agent's writing calls are refused, saying when to retry, with
nothing changed and the refusal recorded; the budget holds across server processes. Both databases.

Windows are aligned to the epoch; the tests use day-long windows (but where a window's end is
the point), so a run straddling a boundary is a one-in-tens-of-thousands event.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_server.auth import mint_token, token_sha256
from mcp_server.config import AgentConfig, Settings, WriteBudget
from mcp_server.db import Database
from tests.conftest import call, call_error, connect, count_rows, http_client, http_server
from tests.test_permissions import refusals
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio

DAY = 86_400


def budgeted(settings: Settings, **budget: Any) -> Settings:
    agents = [AgentConfig(id=name, write_budget=WriteBudget(**budget)) for name in ("runaway", "spender")]
    return settings.model_copy(update={"agents": tuple(agents)})


async def a_project(settings: Settings, era: str) -> int:
    async with connect(settings, era, name="owner") as owner:
        return await make_project(owner)


async def test_over_its_call_budget_an_agent_is_refused_with_when_to_retry_and_nothing_changes(
    settings: Settings, era: str, db: Database
) -> None:
    project = await a_project(settings, era)
    async with connect(budgeted(settings, calls=3, window_seconds=DAY), era, name="runaway") as agent:
        for n in range(3):
            await make_task(agent, project, f"task {n}")
        before = await count_rows(db, "entity")
        message = await call_error(agent, "create_task", {"title": "one too many", "project_id": project})
        assert "write budget is spent" in message and "3 writing calls of 3" in message
        assert re.search(r"Retry after \d{4}-\d\d-\d\dT00:00:00\.000000Z \(in \d+ s\)", message), message
        assert "permission denied" in message and "recorded" in message
        assert await count_rows(db, "entity") == before
        # Reading is not writing: the agent still reads.
        assert len((await call(agent, "search_tasks", {}))["items"]) == 3
    # Another agent's budget is its own.
    async with connect(settings, era, name="owner") as owner:
        await make_task(owner, project, "not budgeted")
    assert await refusals(db) == [("runaway", "create_task", "write_budget")]


async def test_a_row_budget_counts_the_rows_each_call_changes_and_refuses_a_bulk_change_that_overruns_it(
    settings: Settings, era: str, db: Database
) -> None:
    project = await a_project(settings, era)
    async with connect(settings, era, name="owner") as owner:
        ids = [(await make_task(owner, project, f"task {n}"))["id"] for n in range(6)]
    async with connect(budgeted(settings, rows=5, window_seconds=DAY), era, name="runaway") as agent:
        done = await call(agent, "bulk_update_status", {"status": "in_progress", "task_ids": ids[:3]})
        assert done["changed_count"] == 3
        # A dry run writes nothing and costs nothing.
        await call(agent, "bulk_update_status", {"status": "completed", "task_ids": ids, "dry_run": True})
        message = await call_error(agent, "bulk_update_status", {"status": "completed", "task_ids": ids[3:]})
        assert "this call would change 3 rows and 2 of 5 are left" in message
        for task_id in ids[3:]:
            assert (await call(agent, "get_task", {"task_id": task_id}))["status"] == "pending"
        # What is left is still there to spend, and then no more.
        await call(agent, "update_task", {"task_id": ids[3], "status": "in_progress"})
        await call(agent, "update_task", {"task_id": ids[4], "status": "in_progress"})
        message = await call_error(agent, "update_task", {"task_id": ids[5], "status": "in_progress"})
        assert "5 changed rows of 5" in message
    # A revert counts every task it puts back.
    async with connect(settings, era, name="owner") as owner:
        removed = await call(owner, "bulk_delete_tasks", {"task_ids": ids})
    async with connect(budgeted(settings, rows=5, window_seconds=DAY), era, name="spender") as spender:
        message = await call_error(spender, "revert_request", {"request_id": removed["request_id"]})
        assert "this call would change 6 rows and 5 of 5 are left" in message


async def test_a_new_window_gives_the_budget_back(settings: Settings, era: str, db: Database) -> None:
    project = await a_project(settings, era)
    async with connect(budgeted(settings, calls=1, window_seconds=2), era, name="runaway") as agent:
        await make_task(agent, project, "first")
        refused = await call_error(agent, "create_task", {"title": "second", "project_id": project})
        wait = int(re.search(r"\(in (\d+) s\)", refused)[1])  # type: ignore[index]
        assert 1 <= wait <= 2
        retry_after = re.search(r"Retry after (\S+) ", refused)[1]  # type: ignore[index]
        ends = datetime.fromisoformat(retry_after.replace("Z", "+00:00"))
        with anyio.fail_after(wait + 5):  # the window this test is about must end: wait for the clock
            while datetime.now(UTC) < ends:  # noqa: ASYNC110  -- the condition is the clock itself
                await anyio.sleep(0.01)
        await make_task(agent, project, "second")


async def test_the_budget_holds_across_two_server_processes(
    database_url: str, tmp_path: Path, db: Database
) -> None:
    token = mint_token()
    config = {
        "database_url": database_url,
        "agents": [
            {"id": "owner", "token_sha256": token_sha256(owner_token := mint_token())},
            {
                "id": "runaway",
                "token_sha256": token_sha256(token),
                "write_budget": {"calls": 6, "window_seconds": DAY},
            },
        ],
    }
    with http_server(tmp_path, config) as first, http_server(tmp_path, config) as second:
        async with http_client(first, owner_token) as owner:
            project = await make_project(owner)
        async with http_client(first, token) as one, http_client(second, token) as other:

            async def create(client: Client, n: int) -> bool:
                result = await client.call_tool("create_task", {"title": f"task {n}", "project_id": project})
                return not result.is_error

            # Twenty calls at once, half through each process: exactly the budget's six land.
            outcomes = await asyncio.gather(*(create(one if n % 2 else other, n) for n in range(20)))
        assert sum(outcomes) == 6
    assert await count_rows(db, "entity") == 1 + 6
    assert len([r for r in await refusals(db) if r == ("runaway", "create_task", "write_budget")]) == 14
