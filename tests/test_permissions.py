"""Per-agent permissions, enforced in the server; refused calls change nothing and are recorded."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS
from sqlalchemy import text

from mcp_server.config import AgentConfig, ConfigError, Settings
from mcp_server.db import Database
from mcp_server.server import TOOL_NAMES, create_server
from tests.conftest import call, call_error, connect, statements_sent
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio


def with_agent(settings: Settings, agent_id: str, **permissions: Any) -> Settings:
    return settings.model_copy(update={"agents": (AgentConfig(id=agent_id, **permissions),)})


async def entity_rows(db: Database) -> list[tuple[Any, ...]]:
    async with db.engine.connect() as conn:
        return [tuple(row) for row in (await conn.execute(text("SELECT * FROM entity ORDER BY id"))).all()]


async def refusals(db: Database) -> list[tuple[Any, ...]]:
    """Every refusal on the record, in order: each audit entry, then as many times again as its
    window counted repeats of it (refusals.py: the previous window's count is in the next entry,
    the current window's in refusal_tally)."""
    async with db.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT changed_by, new_value FROM audit_entry WHERE action = 'refused' ORDER BY id")
        )
        recorded = [(by, json.loads(value) if isinstance(value, str) else value) for by, value in rows.all()]
        tallies = await conn.execute(text("SELECT agent_id, tool, permission, repeats FROM refusal_tally"))
        current = {(agent, tool, permission): repeats for agent, tool, permission, repeats in tallies.all()}
    refused: list[tuple[Any, ...]] = []
    for index, (by, value) in enumerate(recorded):
        key = (by, value["tool"], value["missing_permission"])
        later = [v for b, v in recorded[index + 1 :] if (b, v["tool"], v["missing_permission"]) == key]
        repeats = later[0].get("repeated_before", 0) if later else current.get(key, 0)
        refused += [key] * (1 + repeats)
    return refused


async def seed(settings: Settings, era: str) -> dict[str, int]:
    async with connect(settings, era, name="owner") as owner:
        project = await make_project(owner)
        task = await make_task(owner, project)
        deleted = await make_task(owner, project, "gone")
        await call(owner, "soft_delete_task", {"task_id": deleted["id"]})
    return {"project": project, "task": task["id"], "deleted": deleted["id"]}


async def test_a_read_only_agent_is_refused_every_write_and_each_refusal_is_recorded(
    settings: Settings, era: str, db: Database
) -> None:
    ids = await seed(settings, era)
    writes: dict[str, dict[str, Any]] = {
        "create_task": {"title": "no", "project_id": ids["project"]},
        "update_task": {"task_id": ids["task"], "status": "blocked"},
        "soft_delete_task": {"task_id": ids["task"]},
        "restore_task": {"task_id": ids["deleted"]},
        "bulk_update_status": {"status": "completed", "task_ids": [ids["task"]]},
        "create_project": {"name": "Another"},
    }
    before = await entity_rows(db)
    async with connect(with_agent(settings, "viewer", read_only=True), era, name="viewer") as viewer:
        for tool, arguments in writes.items():
            message = await call_error(viewer, tool, arguments)
            assert "permission denied" in message and "permission write" in message, tool
        assert (await call(viewer, "get_task", {"task_id": ids["task"]}))["status"] == "pending"
        assert (await call(viewer, "search_tasks", {}))["items"]
        assert (await call(viewer, "verify_audit_log", {}))["ok"]
    assert await entity_rows(db) == before
    assert await refusals(db) == [("viewer", tool, "write") for tool in writes]


async def test_an_agent_may_call_only_the_tools_it_was_granted(
    settings: Settings, era: str, db: Database
) -> None:
    ids = await seed(settings, era)
    granted = with_agent(settings, "narrow", tools=frozenset({"get_task", "update_task"}))
    async with connect(granted, era, name="narrow") as narrow:
        await call(narrow, "update_task", {"task_id": ids["task"], "status": "in_progress"})
        message = await call_error(narrow, "soft_delete_task", {"task_id": ids["task"]})
        assert "tool:soft_delete_task" in message
        message = await call_error(narrow, "search_tasks", {})
        assert "tool:search_tasks" in message
        # A tool it may not call tells it nothing, not even what its arguments should be.
        message = await call_error(narrow, "list_projects", {"bogus": 1})
        assert "tool:list_projects" in message and "name_contains" not in message
        assert "deleted_at" not in await call(narrow, "get_task", {"task_id": ids["task"]})
    assert await refusals(db) == [
        ("narrow", "soft_delete_task", "tool:soft_delete_task"),
        ("narrow", "search_tasks", "tool:search_tasks"),
        ("narrow", "list_projects", "tool:list_projects"),
    ]


async def test_a_bulk_update_over_the_agents_row_limit_changes_nothing(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era, name="owner") as owner:
        project = await make_project(owner)
        ids = [(await make_task(owner, project, f"t{i}"))["id"] for i in range(5)]
    before = await entity_rows(db)
    limited = with_agent(settings, "limited", max_bulk_rows=3)
    pending = {"field": "status", "op": "eq", "value": "pending"}
    async with connect(limited, era, name="limited") as agent:
        with statements_sent() as sent:
            message = await call_error(agent, "bulk_update_status", {"status": "blocked", "filter": pending})
        assert "max_bulk_rows" in message and "5" in message and "3" in message
        # Refused on a count, before any task was locked or an audit entry written.
        assert not [
            sql
            for sql, _ in sent
            if "refusal_tally" not in sql  # the refusal's own record
            and ("UPDATE" in sql or ("INSERT INTO audit_entry" in sql and "SELECT" in sql))
        ]
        assert await entity_rows(db) == before
        result = await call(agent, "bulk_update_status", {"status": "blocked", "task_ids": ids[:3]})
        assert result["changed_count"] == 3
    assert await refusals(db) == [("limited", "bulk_update_status", "max_bulk_rows")]
    async with db.engine.connect() as conn:
        updated = (
            await conn.execute(text("SELECT count(*) FROM audit_entry WHERE action = 'updated'"))
        ).scalar()
    assert updated == 3


async def test_the_tools_setting_lists_and_serves_only_the_chosen_tools(settings: Settings, era: str) -> None:
    chosen = frozenset({"search_tasks", "get_task", "get_audit_trail"})
    async with Client(create_server(settings.model_copy(update={"tools": chosen})), mode=era) as client:  # type: ignore[arg-type]
        assert {tool.name for tool in (await client.list_tools()).tools} == chosen
        message = await call_error(client, "create_project", {"name": "x"})
        assert "create_project" in message
        assert (await call(client, "search_tasks", {}))["items"] == []


READING_TOOLS = frozenset(
    {
        "search_tasks",
        "get_task",
        "get_task_as_of",
        "get_changeset",
        "get_audit_trail",
        "verify_audit_log",
        "list_projects",
        "list_comments",
    }
)


async def listed(client: Client) -> set[str]:
    return {tool.name for tool in (await client.list_tools()).tools}


async def test_tools_list_shows_each_agent_only_the_tools_it_may_call(settings: Settings, era: str) -> None:
    async with connect(settings, era) as anyone:
        assert await listed(anyone) == TOOL_NAMES
    async with connect(with_agent(settings, "viewer", read_only=True), era, name="viewer") as viewer:
        assert await listed(viewer) == READING_TOOLS
        # Hidden is not allowed: a call is still refused (and recorded, see above).
        assert "permission write" in await call_error(viewer, "create_project", {"name": "x"})
    narrow = with_agent(settings, "narrow", tools=frozenset({"get_task", "update_task"}))
    async with connect(narrow, era, name="narrow") as agent:
        assert await listed(agent) == {"get_task", "update_task"}
    both = with_agent(settings, "both", tools=frozenset({"get_task", "update_task"}), read_only=True)
    async with connect(both, era, name="both") as agent:
        assert await listed(agent) == {"get_task"}


async def test_a_tools_list_cursor_is_refused_since_the_list_has_one_page(
    settings: Settings, era: str
) -> None:
    async with connect(settings, era) as client:
        with pytest.raises(MCPError) as refused:
            await client.list_tools(cursor="bogus", cache_mode="bypass")
        assert refused.value.error.code == INVALID_PARAMS and "send no cursor" in refused.value.error.message
        assert await listed(client) == TOOL_NAMES


def test_settings_that_name_an_unknown_tool_are_refused_at_start() -> None:
    assert "verify_audit_log" in TOOL_NAMES
    for settings in (
        Settings(tools=frozenset({"search_tasks", "drop_table"})),
        Settings(agents=(AgentConfig(id="a", tools=frozenset({"serach_tasks"})),)),
    ):
        with pytest.raises(ConfigError, match="unknown tools"):
            create_server(settings)


async def test_a_refusal_repeated_in_a_loop_is_one_audit_entry_a_window_and_its_repeats_are_counted(
    settings: Settings, era: str, db: Database
) -> None:
    reader = with_agent(settings, "reader", read_only=True)
    async with connect(
        reader.model_copy(update={"refusal_window_seconds": 86_400}), era, name="reader"
    ) as agent:
        first = await call_error(agent, "create_project", {"name": "not mine to make"})
        assert "The attempt is recorded in the audit log" in first
        for _ in range(49):
            last = await call_error(agent, "create_project", {"name": "not mine to make"})
        assert "The attempt is counted: 49 like it since the one recorded" in last
    assert await count_refused(db) == 1  # fifty refusals, one entry
    # The next window's first refusal is an entry again, carrying the count of the last.
    async with connect(reader.model_copy(update={"refusal_window_seconds": 1}), era, name="reader") as agent:
        again = await call_error(agent, "create_project", {"name": "not mine to make"})
        assert "The attempt is recorded in the audit log" in again
    assert await count_refused(db) == 2
    assert await refusals(db) == [("reader", "create_project", "write")] * 51


async def count_refused(db: Database) -> int:
    async with db.engine.connect() as conn:
        return int(
            (
                await conn.execute(text("SELECT count(*) FROM audit_entry WHERE action = 'refused'"))
            ).scalar_one()
        )
