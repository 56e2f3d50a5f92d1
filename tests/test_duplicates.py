"""The duplicate guard: create_task refuses a title a live task of the project already has, however
it is written (case, spacing, full-width forms, ligatures, invisible characters), naming that task,
unless the agent says a second one is meant. Both databases."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import insert, text

from mcp_server import schema, titles
from mcp_server.config import Settings
from mcp_server.db import Database
from mcp_server.models import ENTITY_TABLE
from tests.conftest import call, call_error, connect, count_rows
from tests.test_migrations import at_version
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio


def full_width(text: str) -> str:
    """`text` with its ASCII letters, digits and signs in their full-width forms (U+FF01 to U+FF5E)."""
    return "".join(chr(ord(char) + 0xFEE0) if "!" <= char <= "~" else char for char in text)


# Each of these is "Fix the login page" to a reader, and to the guard.
CONFUSABLE = [
    "fix the login page",
    "FIX THE LOGIN PAGE",
    "  Fix   the login\tpage ",
    full_width("Fix the login page"),
    "Fix\u3000the\u00a0login page",  # ideographic and no-break spaces
    "ﬁx the login page",  # the fi ligature
    "Fix the log\u200bin page",  # a zero-width space
    "\ufeffFix the login page\u200d",  # a byte-order mark and a zero-width joiner
    "Fix the login page\u034f\ufe0f",  # a combining grapheme joiner and a variation selector
    "Fix\u3164the\u2800login page",  # a Hangul filler and the braille blank for spaces
]
DIFFERENT = ["Fix the login pages", "Fix the logout page", "Fix the 1ogin page", "Fix thelogin page"]


async def test_a_confusable_title_is_refused_naming_the_live_task_and_nothing_is_created(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client:
        project = await make_project(client)
        original = await make_task(client, project, "Fix the login page")
        before = await count_rows(db, "entity")
        for title in CONFUSABLE:
            message = await call_error(client, "create_task", {"title": title, "project_id": project})
            assert (
                f"already has a live task with this title: task {original['id']} 'Fix the login page'"
                in message
            )
            assert "allow_duplicate=true" in message
        assert await count_rows(db, "entity") == before
        for title in DIFFERENT:
            await make_task(client, project, title)


async def test_the_guard_covers_live_tasks_of_the_same_project_only_and_can_be_overridden(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era) as client:
        one, other = await make_project(client, "one"), await make_project(client, "other")
        first = await make_task(client, one, "Write the report")
        await make_task(client, other, "write the report")  # another project
        second = await call(
            client, "create_task", {"title": "WRITE THE REPORT", "project_id": one, "allow_duplicate": True}
        )
        assert second["id"] != first["id"]
        # With both deleted, the title is free again; a restore brings a duplicate back knowingly.
        await call(client, "soft_delete_task", {"task_id": first["id"]})
        await call(client, "soft_delete_task", {"task_id": second["id"]})
        third = await make_task(client, one, "Write the report")
        await call(client, "restore_task", {"task_id": first["id"]})
        message = await call_error(client, "create_task", {"title": "write the report", "project_id": one})
        assert f"task {min(first['id'], third['id'])}" in message
        # A retitled task is found under its new title, and no longer under its old one.
        await call(client, "update_task", {"task_id": third["id"], "title": "Review the report"})
        await call(client, "soft_delete_task", {"task_id": first["id"]})
        await make_task(client, one, "write the report")
        refused = await call_error(client, "create_task", {"title": "review the REPORT", "project_id": one})
        assert f"task {third['id']}" in refused


async def test_retries_racing_each_other_create_the_task_once(
    settings: Settings, era: str, db: Database
) -> None:
    """The report this guards against: an agent retrying before its first call answered."""
    async with connect(settings, era) as client:
        project = await make_project(client)
        arguments = {"title": "Follow up with the vendor", "project_id": project}
        results = await asyncio.gather(*(client.call_tool("create_task", arguments) for _ in range(8)))
    assert sum(not result.is_error for result in results) == 1
    async with db.engine.connect() as conn:
        titled = await conn.execute(
            text("SELECT count(*) FROM entity WHERE title = 'Follow up with the vendor'")
        )
        assert titled.scalar() == 1


async def test_the_upgrade_keys_the_titles_of_existing_tasks(empty_database_url: str) -> None:
    db = await at_version(empty_database_url, "0010")
    try:
        async with db.engine.begin() as conn:
            await conn.execute(insert(ENTITY_TABLE).values(id=1, kind="project", title="Old", version=1))
            for task_id, title in ((2, full_width("Plan") + "  the Launch"), (3, "Ship it")):
                await conn.execute(
                    insert(ENTITY_TABLE).values(
                        id=task_id,
                        kind="task",
                        title=title,
                        status="pending",
                        priority="medium",
                        project_id=1,
                        version=1,
                    )
                )
            await conn.run_sync(schema.upgrade)
            keys = (await conn.execute(text("SELECT id, title_key FROM entity ORDER BY id"))).all()
        assert [tuple(row) for row in keys] == [
            (1, titles.name_key("old")),  # a project's name, by its skeleton (0016)
            (2, titles.key("plan the launch")),
            (3, titles.key("SHIP IT")),
        ]
    finally:
        await db.dispose()
    settings = Settings(database_url=empty_database_url, agent_id="agent")
    async with connect(settings, "auto") as client:
        message = await call_error(client, "create_task", {"title": "plan the launch", "project_id": 1})
        assert "task 2" in message
