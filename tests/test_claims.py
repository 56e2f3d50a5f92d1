"""Claims with leases: one agent at a time works a task, and a lapsed holder writes nothing over
the next one's work; on both databases, through the protocol, as several agents."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from sqlalchemy import text, update

from mcp_server.auth import mint_token, token_sha256
from mcp_server.config import Settings
from mcp_server.db import Database
from mcp_server.models import ENTITY_TABLE
from tests.conftest import call, call_error, connect, error_text, http_client, http_server

pytestmark = pytest.mark.anyio

TASKS = 48


async def make_tasks(client: Client, *specs: dict[str, Any], project: str = "Queue") -> list[int]:
    project_id = (await call(client, "create_project", {"name": project}))["id"]
    ids = []
    for spec in specs:
        task = await call(client, "create_task", {"project_id": project_id} | spec)
        ids.append(task["id"])
    return ids


async def expire_claims(db: Database) -> None:
    """Let every lease run out, as time passing would (a test does not wait out a lease)."""
    entity = ENTITY_TABLE
    past = datetime(2000, 1, 1, tzinfo=UTC)
    async with db.engine.begin() as conn:
        await conn.execute(
            update(entity).where(entity.c.claimed_by.is_not(None)).values(claim_expires_at=past)
        )


async def audit_actions(db: Database, task_id: int) -> list[tuple[str, str]]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT changed_by, action FROM audit_entry WHERE entity_id = :id ORDER BY id"),
            {"id": task_id},
        )
        return [(row.changed_by, row.action) for row in rows]


async def test_a_claimed_task_is_changed_only_by_its_holder_naming_the_fencing_token(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era, "alice") as alice, connect(settings, era, "bob") as bob:
        [task_id, other_id] = await make_tasks(alice, {"title": "ship it"}, {"title": "other"})
        claimed = await call(alice, "claim_task", {"task_id": task_id, "lease_seconds": 120})
        claim = claimed["claim"]
        assert claim["holder"] == "alice" and claim["fencing_token"] == 1
        assert (await call(alice, "get_task", {"task_id": task_id}))["claim"] == claim

        for tool, arguments in (
            ("update_task", {"task_id": task_id, "status": "in_progress"}),
            ("soft_delete_task", {"task_id": task_id}),
            ("claim_task", {"task_id": task_id}),
            ("renew_claim", {"task_id": task_id, "fencing_token": 1}),
            ("release_claim", {"task_id": task_id, "fencing_token": 1}),
        ):
            message = await call_error(bob, tool, arguments)
            assert "alice" in message and claim["expires_at"] in message, (tool, message)
        bulk = await call(bob, "bulk_update_status", {"status": "cancelled", "task_ids": [task_id, other_id]})
        assert bulk["changed_ids"] == [other_id]  # the held task is left to its holder

        message = await call_error(alice, "update_task", {"task_id": task_id, "status": "in_progress"})
        assert "pass its fencing_token (1)" in message
        message = await call_error(
            alice, "update_task", {"task_id": task_id, "status": "in_progress", "fencing_token": 7}
        )
        assert "fencing token 7 is stale" in message
        updated = await call(
            alice, "update_task", {"task_id": task_id, "status": "in_progress", "fencing_token": 1}
        )
        assert updated["status"] == "in_progress" and updated["claim"]["holder"] == "alice"
        done = await call(
            alice, "update_task", {"task_id": task_id, "status": "completed", "fencing_token": 1}
        )
        assert "claim" not in done  # finishing lets go of the claim
        assert (await call(bob, "update_task", {"task_id": task_id, "title": "shipped"}))[
            "title"
        ] == "shipped"
    assert await audit_actions(db, task_id) == [
        ("alice", "created"),
        ("alice", "claimed"),
        ("alice", "updated"),
        ("alice", "updated"),
        ("bob", "updated"),
    ]


async def test_a_lapsed_lease_frees_the_task_and_its_old_holder_writes_nothing_after_a_new_claim(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era, "alice") as alice, connect(settings, era, "bob") as bob:
        [task_id] = await make_tasks(alice, {"title": "contested"})
        first = (await call(alice, "claim_task", {"task_id": task_id}))["claim"]
        await expire_claims(db)
        assert "claim" not in await call(bob, "get_task", {"task_id": task_id})
        # Lapsed but not yet taken: its holder may still renew it under the same token.
        renewed = await call(
            alice, "renew_claim", {"task_id": task_id, "fencing_token": first["fencing_token"]}
        )
        assert renewed["claim"]["fencing_token"] == first["fencing_token"]
        await expire_claims(db)
        second = (await call(bob, "claim_task", {"task_id": task_id}))["claim"]
        assert (second["holder"], second["fencing_token"]) == ("bob", first["fencing_token"] + 1)

        stale = {"task_id": task_id, "title": "alice's late work", "fencing_token": first["fencing_token"]}
        message = await call_error(alice, "update_task", stale)
        assert "bob" in message
        for tool in ("renew_claim", "release_claim"):
            message = await call_error(
                alice, tool, {"task_id": task_id, "fencing_token": first["fencing_token"]}
            )
            assert "you hold no claim" in message and "held by bob" in message
        assert (await call(bob, "get_task", {"task_id": task_id}))["title"] == "contested"

        released = await call(
            bob, "release_claim", {"task_id": task_id, "fencing_token": second["fencing_token"]}
        )
        assert "claim" not in released
        again = await call(
            bob, "release_claim", {"task_id": task_id, "fencing_token": second["fencing_token"]}
        )
        assert again["version"] == released["version"]  # a repeated release changes nothing
        message = await call_error(alice, "update_task", stale)  # a token from before: still stale
        assert "fencing token 1 is stale" in message
    assert [action for _, action in await audit_actions(db, task_id)] == [
        "created",
        "claimed",
        "renewed",
        "claimed",
        "released",
    ]


async def test_claiming_without_a_task_takes_the_most_urgent_oldest_free_task_matching_the_filter(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era, "alice") as alice, connect(settings, era, "bob") as bob:
        ids = await make_tasks(
            alice,
            {"title": "low, old", "priority": "low"},
            {"title": "high, older"},
            {"title": "high, newer"},
            {"title": "done", "status": "completed", "priority": "critical"},
            {"title": "set aside", "status": "blocked", "priority": "critical"},
            {"title": "gone", "priority": "critical"},
            {"title": "doing", "status": "in_progress", "priority": "medium"},
        )
        low, older, newer, _, _, gone, doing = ids
        for task_id in (older, newer):
            await call(alice, "update_task", {"task_id": task_id, "priority": "high"})
        await call(alice, "soft_delete_task", {"task_id": gone})

        taken = [(await call(agent, "claim_task", {}))["id"] for agent in (alice, bob, alice, bob)]
        assert taken == [older, newer, doing, low]
        message = await call_error(bob, "claim_task", {})
        assert "no task is free to claim" in message

        await expire_claims(db)
        by_title = {"field": "title", "op": "contains", "value": "newer"}
        assert (await call(bob, "claim_task", {"filter": by_title}))["id"] == newer
        oldest_first = [{"field": "created_at", "direction": "asc"}]
        assert (await call(alice, "claim_task", {"order_by": oldest_first}))["id"] == low

        held = await call(
            alice, "search_tasks", {"filter": {"field": "claimed_by", "op": "eq", "value": "alice"}}
        )
        assert [item["id"] for item in held["items"]] == [low]
        assert held["items"][0]["claim"]["holder"] == "alice"
        free = await call(
            alice,
            "search_tasks",
            {"filter": {"field": "claimed_by", "op": "is_null", "value": True}, "order_by": oldest_first},
        )
        assert [item["id"] for item in free["items"]] == [older, ids[3], ids[4], doing]
        message = await call_error(alice, "claim_task", {"task_id": ids[3]})
        assert "completed: only pending or in_progress tasks can be claimed" in message
        message = await call_error(alice, "claim_task", {"task_id": low, "filter": by_title})
        assert "not both" in message


async def test_a_read_only_agent_cannot_claim(settings: Settings, era: str, db: Database) -> None:
    restricted = Settings.model_validate(
        settings.model_dump() | {"agents": [{"id": "viewer", "read_only": True}]}
    )
    async with connect(settings, era, "alice") as alice, connect(restricted, era, "viewer") as viewer:
        [task_id] = await make_tasks(alice, {"title": "look, don't touch"})
        message = await call_error(viewer, "claim_task", {"task_id": task_id})
        assert "read-only" in message
        assert "claim" not in await call(alice, "get_task", {"task_id": task_id})


async def test_sixteen_agents_on_two_servers_each_take_different_tasks_and_lapsed_ones_are_taken_again(
    database_url: str, tmp_path: Path, db: Database
) -> None:
    tokens = {f"agent-{n:02}": mint_token() for n in range(16)}
    config = {
        "database_url": database_url,
        "agents": [{"id": agent, "token_sha256": token_sha256(token)} for agent, token in tokens.items()],
    }
    dying = {"agent-00", "agent-05", "agent-10"}  # each takes one task and stops, its lease left to run out
    with (
        http_server(tmp_path, config, extra_args=["--stateless"]) as first,
        http_server(tmp_path, config, extra_args=["--stateless"]) as second,
    ):
        servers = [first, second]
        async with http_client(first, tokens["agent-01"]) as setup:
            project = await call(setup, "create_project", {"name": "the queue"})
            for n in range(TASKS):
                await call(setup, "create_task", {"title": f"task {n}", "project_id": project["id"]})
        held_by_the_dead: dict[str, dict[str, Any]] = {}

        async def work(agent: str, server: str) -> None:
            async with http_client(server, tokens[agent], client_name=agent) as client:
                while True:
                    result = await client.call_tool("claim_task", {"lease_seconds": 600})
                    if result.is_error:
                        assert "no task is free to claim" in error_text(result)
                        return
                    task = result.structured_content
                    assert task is not None and task["claim"]["holder"] == agent
                    if agent in dying and agent not in held_by_the_dead:
                        held_by_the_dead[agent] = task
                        return
                    token = task["claim"]["fencing_token"]
                    done = {"task_id": task["id"], "status": "completed", "fencing_token": token}
                    await call(client, "update_task", done)

        living = sorted(set(tokens) - dying)
        async with anyio.create_task_group() as group:  # the agents that die take their task first
            for n, agent in enumerate(sorted(dying)):
                group.start_soon(work, agent, servers[n % 2])
        assert len(held_by_the_dead) == len(dying)
        async with anyio.create_task_group() as group:
            for n, agent in enumerate(living):
                group.start_soon(work, agent, servers[n % 2])

        await expire_claims(db)  # the dead agents' leases run out
        async with anyio.create_task_group() as group:
            for n, agent in enumerate(living):
                group.start_soon(work, agent, servers[n % 2])
        for agent, task in held_by_the_dead.items():  # back from the dead, too late
            async with http_client(servers[0], tokens[agent], client_name=agent) as client:
                late = {
                    "task_id": task["id"],
                    "status": "cancelled",
                    "fencing_token": task["claim"]["fencing_token"],
                }
                assert "is stale" in await call_error(client, "update_task", late)
        async with http_client(first, tokens["agent-01"]) as client:
            everything = await call(client, "search_tasks", {"limit": 100})
            assert [item["status"] for item in everything["items"]] == ["completed"] * TASKS
            assert all("claim" not in item for item in everything["items"])
            assert (await call(client, "verify_audit_log"))["ok"]

    async with db.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT entity_id, changed_by, action, new_value FROM audit_entry "
                    "WHERE action IN ('claimed', 'updated') ORDER BY id"
                )
            )
        ).all()
    story: dict[int, list[tuple[str, str]]] = {}
    for row in rows:
        story.setdefault(row.entity_id, []).append((row.changed_by, row.action))
    reclaimed = {task["id"] for task in held_by_the_dead.values()}
    assert len(story) == TASKS
    for task_id, events in story.items():
        # Each task: claimed, then completed by the agent that claimed it; a dead agent's task was
        # claimed once more, by a live agent, who completed it. Nobody else wrote in between.
        *claims, (finisher, last) = events
        assert last == "updated" and [action for _, action in claims] == ["claimed"] * len(claims)
        assert claims[-1][0] == finisher
        assert len(claims) == (2 if task_id in reclaimed else 1), events
        if task_id in reclaimed:
            assert claims[0][0] in dying and finisher not in dying
