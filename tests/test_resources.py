"""Task data as resources: the same reads as the tools, through the protocol, on both databases."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    ResourceTemplateReference,
    TextResourceContents,
)
from sqlalchemy import text

from mcp_server.config import Settings
from mcp_server.db import Database
from tests.conftest import call, connect
from tests.test_permissions import refusals, with_agent
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio


async def read(client: Client, uri: str) -> Any:
    result = await client.read_resource(uri)
    [content] = result.contents
    assert isinstance(content, TextResourceContents) and content.mime_type == "application/json"
    assert str(content.uri) == uri
    return json.loads(content.text)


async def refused(client: Client, uri: str) -> MCPError:
    with pytest.raises(MCPError) as error:
        await client.read_resource(uri)
    return error.value


async def test_the_templates_name_tasks_projects_and_a_projects_tasks(client: Client) -> None:
    templates = (await client.list_resource_templates()).resource_templates
    assert {t.uri_template: t.mime_type for t in templates} == {
        "task://{task_id}": "application/json",
        "project://{project_id}": "application/json",
        "project://{project_id}/tasks": "application/json",
    }
    assert (await client.list_resources()).resources == []  # a million tasks are no list


async def test_a_resource_shows_what_the_tool_shows(client: Client) -> None:
    project = await make_project(client, "Apollo")
    other = await make_project(client, "Gemini")
    first = await make_task(client, project, "first")
    second = await make_task(client, project, "second")
    await make_task(client, other, "elsewhere")
    gone = await make_task(client, project, "gone")
    await call(client, "soft_delete_task", {"task_id": gone["id"]})

    assert await read(client, f"task://{first['id']}") == await call(
        client, "get_task", {"task_id": first["id"]}
    )
    [listed] = (await call(client, "list_projects", {"name_contains": "Apollo"}))["items"]
    assert await read(client, f"project://{project}") == listed
    page = await read(client, f"project://{project}/tasks")
    assert [task["id"] for task in page["items"]] == [second["id"], first["id"]] and not page["has_more"]
    in_project = {"field": "project_id", "op": "eq", "value": project}
    assert page == await call(client, "search_tasks", {"filter": in_project, "limit": 100})


async def test_a_missing_or_deleted_task_or_a_bad_id_is_an_error_that_says_so(client: Client) -> None:
    project = await make_project(client)
    gone = await make_task(client, project, "gone")
    await call(client, "soft_delete_task", {"task_id": gone["id"]})
    for uri, says in (
        ("task://424242", "does not exist"),
        (f"task://{gone['id']}", "restore_task"),
        ("task://seven", "whole numbers from 1"),
        ("task://0", "whole numbers from 1"),
        ("task://" + "9" * 5000, "whole numbers from 1"),
        ("task://²", "whole numbers from 1"),  # a digit to str.isdigit, not to int()
        ("task://٢", "whole numbers from 1"),
        ("task://02", "whole numbers from 1"),
        ("task://9007199254740992", "whole numbers from 1 to 9007199254740991"),
        ("project://424242", "list_projects"),
        ("project://424242/tasks", "list_projects"),
    ):
        error = await refused(client, uri)
        assert error.error.code == INVALID_PARAMS and says in error.error.message, (uri, error.error)


async def test_an_agent_reads_a_resource_only_when_it_may_call_the_tool_that_shows_it(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as owner:
        project = await make_project(owner)
        task = await make_task(owner, project)
    narrow = with_agent(settings, "narrow", tools=frozenset({"get_task"}))
    async with connect(narrow, era, name="narrow") as agent:
        assert (await read(agent, f"task://{task['id']}"))["id"] == task["id"]
        for uri, tool in (
            (f"project://{project}", "list_projects"),
            (f"project://{project}/tasks", "search_tasks"),
        ):
            error = await refused(agent, uri)
            assert f"permission tool:{tool} is missing" in error.error.message
            assert "recorded in the audit log" in error.error.message
            assert error.error.code == INVALID_REQUEST  # a refusal, not a failure of the server
    # Recorded as refused tool calls are, with the URI asked for.
    assert await refusals(db) == [
        ("narrow", "resources/read", "tool:list_projects"),
        ("narrow", "resources/read", "tool:search_tasks"),
    ]
    async with connect(with_agent(settings, "viewer", read_only=True), era, name="viewer") as viewer:
        assert (await read(viewer, f"project://{project}/tasks"))["items"][0]["id"] == task["id"]


async def test_the_server_declares_only_what_it_serves_in_both_eras(client: Client, era: str) -> None:
    capabilities = client.server_capabilities
    assert capabilities.prompts is None and capabilities.completions is not None
    assert capabilities.logging is not None  # logging/setLevel (test_client_logs.py)
    # resources/subscribe, and subscriptions/listen in the 2026-07-28 era (test_subscriptions.py)
    assert capabilities.resources is not None and capabilities.resources.subscribe
    # The 2026-07-28 era derives listChanged from subscriptions/listen being served; the lists
    # never change, so a listener is told of no change. The handshake era says so outright.
    assert capabilities.resources.list_changed == (era == "auto")
    assert capabilities.tools is not None and capabilities.tools.list_changed == (era == "auto")
    with pytest.raises(MCPError) as error:  # no prompts: an unknown method, not a crash
        await client.get_prompt("triage")
    assert error.value.error.code == METHOD_NOT_FOUND


async def test_a_project_id_completes_to_the_live_projects_it_begins_with(
    settings: Settings, era: str, client: Client, db: Database
) -> None:
    ids = [await make_project(client, f"p{i}") for i in range(12)]
    gone = ids.pop()
    async with db.engine.begin() as conn:  # no tool deletes a project: behind the server's back
        await conn.execute(
            text("UPDATE entity SET deleted_at = CURRENT_TIMESTAMP WHERE id = :id"), {"id": gone}
        )
    template = ResourceTemplateReference(type="ref/resource", uri="project://{project_id}/tasks")
    everything = (await client.complete(template, {"name": "project_id", "value": ""})).completion
    assert everything.values == [str(i) for i in sorted(ids)] and not everything.has_more
    prefix = str(ids[-1])[:-1]
    begun = (await client.complete(template, {"name": "project_id", "value": prefix})).completion
    assert begun.values == [str(i) for i in sorted(ids) if str(i).startswith(prefix)] and begun.values
    task = ResourceTemplateReference(type="ref/resource", uri="task://{task_id}")
    assert (await client.complete(task, {"name": "task_id", "value": "1"})).completion.values == []
    assert (await client.complete(template, {"name": "project_id", "value": "1%"})).completion.values == []
    narrow = with_agent(settings, "narrow", tools=frozenset({"get_task"}))
    async with connect(narrow, era, name="narrow") as agent:  # may not list projects: completes nothing
        assert (await agent.complete(template, {"name": "project_id", "value": ""})).completion.values == []
