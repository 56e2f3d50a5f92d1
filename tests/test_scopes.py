"""Project scopes: an agent given some projects reads and changes those and nothing else, through
every tool, search, bulk change, claim and resource; each refusal names the missing scope and is
recorded. Both databases."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from mcp_server.auth import AgentToken, AgentTokenVerifier
from mcp_server.config import AgentConfig, JwtConfig, Permissions, Settings
from mcp_server.db import Database
from tests.conftest import call, call_error, connect
from tests.test_permissions import entity_rows, refusals
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio


async def two_projects(settings: Settings, era: str) -> dict[str, Any]:
    """Projects "ours" and "theirs", each with two pending tasks, made by an unscoped owner."""
    async with connect(settings, era, name="owner") as owner:
        ours, theirs = await make_project(owner, "ours"), await make_project(owner, "theirs")
        return {
            "ours": ours,
            "theirs": theirs,
            "our_tasks": [(await make_task(owner, ours, f"ours {n}"))["id"] for n in range(2)],
            "their_tasks": [(await make_task(owner, theirs, f"theirs {n}"))["id"] for n in range(2)],
        }


def scoped(settings: Settings, projects: set[int], **permissions: Any) -> Client:
    agent = AgentConfig(id="scoped", projects=frozenset(projects), **permissions)
    return settings.model_copy(update={"agents": (agent,), "agent_id": "scoped"})  # type: ignore[return-value]


async def test_a_scoped_agent_sees_only_its_projects_in_searches_lists_trails_and_claims(
    settings: Settings, era: str, db: Database
) -> None:
    ids = await two_projects(settings, era)
    async with connect(scoped(settings, {ids["ours"]}), era, name="scoped") as agent:  # type: ignore[arg-type]
        found = await call(agent, "search_tasks", {"include_total": True})
        assert sorted(task["id"] for task in found["items"]) == sorted(ids["our_tasks"])
        assert found["total"] == 2
        # Asking for the other project by filter finds nothing, rather than its tasks.
        theirs = {"field": "project_id", "op": "eq", "value": ids["theirs"]}
        assert (await call(agent, "search_tasks", {"filter": theirs}))["items"] == []
        either = {"or": [theirs, {"field": "title", "op": "contains", "value": "theirs"}]}
        assert (await call(agent, "search_tasks", {"filter": either, "include_deleted": True}))["items"] == []
        assert [p["id"] for p in (await call(agent, "list_projects", {}))["items"]] == [ids["ours"]]
        trail = await call(agent, "get_audit_trail", {"limit": 100})
        assert {entry["entity_id"] for entry in trail["items"]} == {ids["ours"], *ids["our_tasks"]}
        # The next free task comes from its projects only, however many times it asks.
        claimed = [(await call(agent, "claim_task", {}))["id"] for _ in ids["our_tasks"]]
        assert sorted(claimed) == sorted(ids["our_tasks"])
        assert "no task is free to claim" in await call_error(agent, "claim_task", {})


async def test_every_tool_refuses_a_task_or_project_outside_the_scope_names_it_and_records_it(
    settings: Settings, era: str, db: Database
) -> None:
    ids = await two_projects(settings, era)
    ours, theirs = ids["our_tasks"][0], ids["their_tasks"][0]
    attempts: dict[str, dict[str, Any]] = {
        "get_task": {"task_id": theirs},
        "update_task": {"task_id": theirs, "status": "in_progress"},
        "soft_delete_task": {"task_id": theirs},
        "restore_task": {"task_id": theirs},
        "claim_task": {"task_id": theirs},
        "renew_claim": {"task_id": theirs, "fencing_token": 0},
        "release_claim": {"task_id": theirs, "fencing_token": 0},
        "add_dependency": {"task_id": ours, "blocked_by": theirs},
        "remove_dependency": {"task_id": theirs, "blocked_by": ours},
        "add_comment": {"task_id": theirs, "body": "hello"},
        "list_comments": {"task_id": theirs},
        "get_audit_trail": {"entity_id": theirs},
        "create_task": {"title": "smuggled", "project_id": ids["theirs"]},
        "bulk_update_status": {"status": "completed", "task_ids": [ours, theirs]},
        "bulk_delete_tasks": {"task_ids": [ours, theirs]},
        "rename_project": {"project_id": ids["theirs"], "name": "mine now"},
        "delete_project": {"project_id": ids["theirs"], "live_tasks": "delete"},
        "restore_project": {"project_id": ids["theirs"]},
    }
    before = await entity_rows(db)
    async with connect(scoped(settings, {ids["ours"]}), era, name="scoped") as agent:  # type: ignore[arg-type]
        for tool, arguments in attempts.items():
            message = await call_error(agent, tool, arguments)
            assert f"permission project:{ids['theirs']} is missing" in message, (tool, message)
            assert "recorded" in message, tool
        # Moving its own task into the other project is refused too, and so is making a project.
        moved = await call_error(agent, "update_task", {"task_id": ours, "project_id": ids["theirs"]})
        assert f"permission project:{ids['theirs']} is missing" in moved
        made = await call_error(agent, "create_project", {"name": "new"})
        assert "permission project:* is missing" in made
        unlinked = await call_error(agent, "remove_dependency", {"task_id": ours, "blocked_by": theirs})
        assert f"permission project:{ids['theirs']} is missing" in unlinked
        # A resource of the other project is refused the same way, and recorded.
        for uri in (f"task://{theirs}", f"project://{ids['theirs']}", f"project://{ids['theirs']}/tasks"):
            with pytest.raises(MCPError, match=f"permission project:{ids['theirs']} is missing"):
                await agent.read_resource(uri)
        # Its own project's reads still work.
        assert (await call(agent, "get_task", {"task_id": ours}))["id"] == ours
    assert await entity_rows(db) == before
    recorded = await refusals(db)
    expected = [("scoped", tool, f"project:{ids['theirs']}") for tool in attempts]
    expected += [
        ("scoped", "update_task", f"project:{ids['theirs']}"),
        ("scoped", "create_project", "project:*"),
    ]
    expected += [("scoped", "remove_dependency", f"project:{ids['theirs']}")]
    expected += [("scoped", "resources/read", f"project:{ids['theirs']}")] * 3
    # Each once, but for the repeats of one tool and permission, counted beside its entry.
    assert sorted(recorded) == sorted(expected)


async def test_a_bulk_change_by_filter_never_touches_tasks_outside_the_scope(
    settings: Settings, era: str, db: Database
) -> None:
    ids = await two_projects(settings, era)
    everything = {"field": "status", "op": "eq", "value": "pending"}
    async with connect(scoped(settings, {ids["ours"]}), era, name="scoped") as agent:  # type: ignore[arg-type]
        preview = await call(
            agent, "bulk_update_status", {"status": "cancelled", "filter": everything, "dry_run": True}
        )
        assert sorted(preview["changed_ids"]) == sorted(ids["our_tasks"])
        done = await call(agent, "bulk_update_status", {"status": "cancelled", "filter": everything})
        assert sorted(done["changed_ids"]) == sorted(ids["our_tasks"])
        # Deleting by filter too; and moving its tasks out to a project beyond its scope is refused.
        preview = await call(
            agent, "bulk_delete_tasks", {"filter": {"field": "id", "op": "ne", "value": 0}, "dry_run": True}
        )
        assert sorted(preview["changed_ids"]) == sorted(ids["our_tasks"])
        moving = {"project_id": ids["ours"], "live_tasks": "move", "move_to": ids["theirs"]}
        assert f"permission project:{ids['theirs']} is missing" in await call_error(
            agent, "delete_project", moving
        )
    async with connect(settings, era, name="owner") as owner:
        for task_id in ids["their_tasks"]:
            assert (await call(owner, "get_task", {"task_id": task_id}))["status"] == "pending"
        for task_id in ids["our_tasks"]:
            assert (await call(owner, "get_task", {"task_id": task_id}))["status"] == "cancelled"


async def test_an_empty_scope_reaches_nothing(settings: Settings, era: str, db: Database) -> None:
    ids = await two_projects(settings, era)
    async with connect(scoped(settings, set()), era, name="scoped") as agent:  # type: ignore[arg-type]
        assert (await call(agent, "search_tasks", {}))["items"] == []
        assert (await call(agent, "list_projects", {}))["items"] == []
        message = await call_error(agent, "get_task", {"task_id": ids["our_tasks"][0]})
        assert f"permission project:{ids['ours']} is missing" in message


SECRET = "a shared secret for HS256, long enough for the test"


async def test_jwt_project_scopes_narrow_what_the_other_scopes_grant() -> None:
    config = JwtConfig(
        issuer="https://id.example.com",
        audience="tasks",
        algorithms=("HS256",),
        scopes={"tasks.write": Permissions(), "team.a": Permissions(projects=frozenset({1, 2}))},
    )
    verifier = AgentTokenVerifier(Settings(jwt=config, jwt_secret=SECRET))  # type: ignore[arg-type]

    async def permissions(scope: str) -> Permissions:
        claims = {
            "sub": "bot",
            "iss": config.issuer,
            "aud": "tasks",
            "exp": int(time.time()) + 60,
            "scope": scope,
        }
        token = await verifier.verify_token(jwt.encode(claims, SECRET, algorithm="HS256"))
        assert isinstance(token, AgentToken)
        return token.permissions

    assert (await permissions("tasks.write")).projects is None
    assert (await permissions("tasks.write project:7 project:9")).projects == {7, 9}
    assert (await permissions("team.a")).projects == {1, 2}
    assert (await permissions("team.a project:2 project:3")).projects == {2}  # only within what it grants
    nothing = await permissions("project:7")  # a project scope alone grants no tool
    assert nothing.read_only and nothing.tools == frozenset()


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # the handshake era's form
async def test_a_scoped_agent_may_subscribe_only_to_resources_of_its_projects(
    settings: Settings, db: Database
) -> None:
    ids = await two_projects(settings, "legacy")
    async with connect(scoped(settings, {ids["ours"]}), "legacy", name="scoped") as agent:  # type: ignore[arg-type]
        await agent.subscribe_resource(f"task://{ids['our_tasks'][0]}")
        await agent.subscribe_resource(f"project://{ids['ours']}/tasks")
        for uri in (
            f"task://{ids['their_tasks'][0]}",
            f"project://{ids['theirs']}",
            f"project://{ids['theirs']}/tasks",
        ):
            with pytest.raises(MCPError, match=f"permission project:{ids['theirs']} is missing"):
                await agent.subscribe_resource(uri)
        with pytest.raises(MCPError, match="no task has id 999999"):
            await agent.subscribe_resource("task://999999")
