"""Bad input: a clear ToolError that says what is allowed, no change, and the server keeps serving."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mcp import Client

from mcp_server import arguments
from mcp_server.db import Database
from tests.conftest import call, call_error, snapshot, statements_sent
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio

LEAKS = (
    "SELECT",
    "INSERT",
    "UPDATE ",
    "sqlalchemy",
    "asyncpg",
    "sqlite3",
    "[SQL",
    "Traceback",
    "postgresql://",
    # pydantic's own words: the agent should read what to send, not how the server checks it
    "validation error",
    "Arguments",
    "pydantic",
    "discriminator",
    "type=",
    "after validation",
    ".str",
    "union[",
)
STATUS_PENDING = {"field": "status", "op": "eq", "value": "pending"}


def nest(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"field": "status", "op": "eq", "value": "pending"}
    for _ in range(depth):
        node = {"and": [node]}
    return node


CASES: list[tuple[str, dict[str, Any], str]] = [
    ("search_tasks", {"filter": {"field": "secret", "op": "eq", "value": 1}}, "title"),
    ("search_tasks", {"filter": {"field": "status", "op": "like", "value": "x"}}, "contains"),
    (
        "search_tasks",
        {"filter": {"field": "status", "op": "contains", "value": "pend"}},
        "allowed: eq, in, ne",
    ),
    ("search_tasks", {"filter": {"field": "status", "op": "eq", "value": "done"}}, "in_progress"),
    ("search_tasks", {"filter": {"field": "id", "op": "eq", "value": "seven"}}, "integer"),
    ("search_tasks", {"filter": {"field": "created_at", "op": "after", "value": "yesterday"}}, "ISO 8601"),
    # Times that leave the years 1 to 9999 once converted to UTC (they overflowed, with a traceback).
    (
        "search_tasks",
        {"filter": {"field": "created_at", "op": "after", "value": "0001-01-01T00:00:00+14:00"}},
        "ISO 8601",
    ),
    ("get_audit_trail", {"since": "9999-12-31T23:59:59-14:00"}, "years 1 to 9999 once converted to UTC"),
    ("get_task_as_of", {"task_id": 1, "at": "0001-01-01T00:00:00+14:00"}, "at: the time falls outside"),
    ("search_tasks", {"filter": {"field": "title", "op": "in", "value": "a"}}, "list"),
    ("search_tasks", {"filter": {"field": "deleted_at", "op": "is_null", "value": "yes"}}, "true or false"),
    ("search_tasks", {"filter": nest(5)}, "deeper than 4"),
    (
        "search_tasks",
        {"filter": {"or": [{"field": "id", "op": "eq", "value": i} for i in range(60)]}},
        "50 nodes",
    ),
    ("search_tasks", {"filter": {"and": []}}, "at least 1"),
    ("search_tasks", {"filter": {"field": "title", "op": "contains", "value": "x", "extra": 1}}, "extra"),
    ("search_tasks", {"limit": 101}, "less than or equal to 100"),
    ("search_tasks", {"limit": 0}, "greater than or equal to 1"),
    ("search_tasks", {"order_by": [{"field": "description"}]}, "created_at"),
    ("search_tasks", {"order_by": [{"field": "title"}, {"field": "title"}]}, "twice"),
    ("search_tasks", {"unknown_argument": True}, "unknown_argument"),
    ("create_task", {"title": "t", "project_id": 1, "status": "done"}, "in_progress"),
    ("create_task", {"title": "t", "project_id": 1, "priority": "urgent"}, "critical"),
    ("create_task", {"title": "", "project_id": 1}, "at least 1 character"),
    ("create_task", {"title": "   ", "project_id": 1}, "at least 1 character"),
    ("update_task", {"task_id": 1, "title": " \t "}, "at least 1 character"),
    ("create_project", {"name": "  "}, "at least 1 character"),
    ("create_task", {"title": "t" * 201, "project_id": 1}, "at most 200"),
    ("create_task", {"title": "t", "project_id": 424242}, "list_projects"),
    ("create_task", {"title": "t", "project_id": "one"}, "integer"),
    ("get_task", {"task_id": 424242}, "does not exist"),
    ("update_task", {"task_id": 424242, "title": "x"}, "does not exist"),
    ("update_task", {"task_id": 1}, "at least one field"),
    ("soft_delete_task", {"task_id": 424242}, "does not exist"),
    ("restore_task", {"task_id": 424242}, "does not exist"),
    ("bulk_update_status", {"status": "completed"}, "either filter or task_ids"),
    ("bulk_update_status", {"status": "finished", "task_ids": [1]}, "in_progress"),
    ("bulk_update_status", {"status": "completed", "task_ids": list(range(1, 1002))}, "at most 1000"),
    ("get_audit_trail", {"entity_id": 424242}, "no task or project"),
    ("get_audit_trail", {"entity_id": 1, "since": "yesterday"}, "since"),
    # The mistakes language models make most with a filter: each names the argument and shows the shape.
    (
        "search_tasks",
        {"filter": "status=pending"},
        'filter must be a filter object, not a string ("status=pending")',
    ),
    ("search_tasks", {"filter": [STATUS_PENDING]}, "filter must be a filter object, not a list"),
    (
        "search_tasks",
        {"filter": {"status": "pending"}},
        "filter is not a filter condition (it lacks field and op",
    ),
    (
        "bulk_update_status",
        {"status": "completed", "filter": {"and": [{"field": "status", "value": "x"}]}},
        "filter.and[0] is not a filter condition (it lacks op)",
    ),
    ("search_tasks", {"filter": {"and": STATUS_PENDING}}, "filter.and must be a list, not an object"),
    (
        "search_tasks",
        {"order_by": "title"},
        'order_by must be a list, not a string ("title"); order_by is, for example',
    ),
    ("create_task", {"title": "t"}, "project_id is missing and required"),
    (
        "search_tasks",
        {"filter": {"field": "title", "op": "contains", "value": {"a": 1}}},
        "filter.value must be text, a whole number, true or false or a list",
    ),
    (
        "bulk_update_status",
        {"status": "completed", "task_ids": []},
        "task_ids: should have at least 1 item, not 0",
    ),
    (
        "get_audit_trail",
        {"since": "yesterday"},
        "since must be an ISO 8601 time such as 2026-01-31T09:00:00Z",
    ),
    ("search_tasks", {"order_by": ["bogus"]}, 'order_by is, for example, [{"field"'),
    ("list_projects", {"limit": 500}, "less than or equal to 100"),
    ("no_such_tool", {}, "no_such_tool"),
]


@pytest.mark.parametrize(
    ("tool", "arguments", "hint"), CASES, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(CASES)]
)
async def test_bad_input_gets_a_tool_error_that_says_what_to_fix_and_changes_nothing(
    client: Client, db: Database, tool: str, arguments: dict[str, Any], hint: str
) -> None:
    project_id = await make_project(client)
    await make_task(client, project_id)
    before = await snapshot(db)
    message = await call_error(client, tool, arguments)
    assert hint.lower() in message.lower(), message
    assert not any(leak in message for leak in LEAKS), message
    assert await snapshot(db) == before
    assert (await call(client, "search_tasks", {}))["items"], "the server stopped serving"


async def test_search_query_count_does_not_grow_with_page_size(client: Client) -> None:
    projects = [await make_project(client, f"p{i}") for i in range(5)]
    for i in range(100):
        await make_task(client, projects[i % 5], f"task {i}")
    counts = {}
    for limit in (1, 100):
        with statements_sent() as statements:
            page = await call(client, "search_tasks", {"limit": limit, "include_total": True})
        assert len(page["items"]) == limit
        assert {t["project"]["name"] for t in page["items"]} <= {f"p{i}" for i in range(5)}
        counts[limit] = sum(sql.lstrip().upper().startswith("SELECT") for sql, _ in statements)
    assert counts[1] == counts[100] == 2  # the page with its projects joined in, and the total


@pytest.mark.parametrize(
    "wrong",
    [
        "status=pending",
        [STATUS_PENDING],
        {"status": "pending"},
        {"or": STATUS_PENDING},
        {"and": [{"op": "eq"}]},
    ],
)
async def test_a_filter_of_the_wrong_shape_is_answered_with_the_shape_of_a_right_one(
    client: Client, wrong: Any
) -> None:
    message = await call_error(client, "search_tasks", {"filter": wrong})
    assert message.count(arguments.FILTER_EXAMPLE) >= 1 and '{"and": [' in message, message
    assert "filter" in message.split("A filter is")[0], message


async def test_a_filter_sent_as_a_json_string_is_read_as_json(client: Client) -> None:
    """Some clients send an object argument as a JSON string (Claude Desktop among them)."""
    project_id = await make_project(client)
    await make_task(client, project_id, "pending one")
    page = await call(client, "search_tasks", {"filter": json.dumps(STATUS_PENDING)})
    assert [task["title"] for task in page["items"]] == ["pending one"]
