"""Handoff comments: attributed to the verified agent, append-only, readable since a cursor; on
both databases, through the protocol."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from mcp_server.config import Settings
from mcp_server.db import Database
from tests.conftest import call, call_error, connect
from tests.test_claims import audit_actions, make_tasks

pytestmark = pytest.mark.anyio


async def test_agents_hand_over_with_comments_read_since_the_last_one_seen(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era, "alice") as alice, connect(settings, era, "bob") as bob:
        [task_id] = await make_tasks(alice, {"title": "migrate the billing data"})
        first = await call(alice, "add_comment", {"task_id": task_id, "body": "  Half done: tables a-m.  "})
        assert (first["author"], first["body"]) == ("alice", "Half done: tables a-m.")
        seen = await call(bob, "list_comments", {"task_id": task_id})
        assert [c["body"] for c in seen["items"]] == ["Half done: tables a-m."] and not seen["has_more"]
        await call(bob, "add_comment", {"task_id": task_id, "body": "Took over; n-z running."})
        await call(bob, "add_comment", {"task_id": task_id, "body": "Done."})
        since = await call(alice, "list_comments", {"task_id": task_id, "after": seen["last_id"], "limit": 1})
        assert [(c["author"], c["body"]) for c in since["items"]] == [("bob", "Took over; n-z running.")]
        assert since["has_more"]
        rest = await call(alice, "list_comments", {"task_id": task_id, "after": since["last_id"]})
        assert [c["body"] for c in rest["items"]] == ["Done."] and "last_id" in rest
        nothing = await call(alice, "list_comments", {"task_id": task_id, "after": rest["last_id"]})
        assert nothing == {"items": [], "has_more": False}

        for body in ("", "   ", "nul\x00"):
            message = await call_error(alice, "add_comment", {"task_id": task_id, "body": body})
            assert "body" in message
        await call(alice, "soft_delete_task", {"task_id": task_id})
        assert "was deleted" in await call_error(bob, "add_comment", {"task_id": task_id, "body": "late"})
    assert await audit_actions(db, task_id) == [
        ("alice", "created"),
        ("alice", "commented"),
        ("bob", "commented"),
        ("bob", "commented"),
        ("alice", "deleted"),
    ]


async def test_a_read_only_agent_reads_comments_but_cannot_add_them(
    settings: Settings, era: str, db: Database
) -> None:
    restricted = Settings.model_validate(
        settings.model_dump() | {"agents": [{"id": "viewer", "read_only": True}]}
    )
    async with connect(settings, era, "alice") as alice, connect(restricted, era, "viewer") as viewer:
        [task_id] = await make_tasks(alice, {"title": "watched"})
        await call(alice, "add_comment", {"task_id": task_id, "body": "hello"})
        assert len((await call(viewer, "list_comments", {"task_id": task_id}))["items"]) == 1
        assert "read-only" in await call_error(viewer, "add_comment", {"task_id": task_id, "body": "hi"})


async def test_the_database_refuses_to_change_or_remove_a_comment(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era, "alice") as alice:
        [task_id] = await make_tasks(alice, {"title": "said"})
        await call(alice, "add_comment", {"task_id": task_id, "body": "as it was"})
    for statement in ("UPDATE task_comment SET body = 'rewritten'", "DELETE FROM task_comment"):
        with pytest.raises(DBAPIError):
            async with db.engine.begin() as conn:
                await conn.execute(text(statement))
    async with db.engine.connect() as conn:
        assert (await conn.execute(text("SELECT body FROM task_comment"))).scalars().all() == ["as it was"]
