"""The tools, through the MCP protocol (in-memory client, both protocol eras), on both databases."""

from __future__ import annotations

import base64
import getpass
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from mcp import Client
from mcp.types import Implementation
from sqlalchemy import text

from mcp_server.config import Settings
from mcp_server.db import Database
from mcp_server.server import create_server
from tests.conftest import AGENT, call, call_error, connect, count_rows, snapshot

pytestmark = pytest.mark.anyio

EXPECTED_TOOLS = {
    "search_tasks",
    "get_task",
    "get_task_as_of",
    "create_task",
    "update_task",
    "soft_delete_task",
    "restore_task",
    "bulk_update_status",
    "apply_changeset",
    "get_changeset",
    "bulk_delete_tasks",
    "revert_request",
    "claim_task",
    "renew_claim",
    "release_claim",
    "add_dependency",
    "remove_dependency",
    "add_comment",
    "list_comments",
    "get_audit_trail",
    "verify_audit_log",
    "create_project",
    "rename_project",
    "delete_project",
    "restore_project",
    "list_projects",
}


async def make_project(client: Client, name: str = "Apollo") -> int:
    return int((await call(client, "create_project", {"name": name}))["id"])


async def make_task(client: Client, project_id: int, title: str = "a task", **fields: Any) -> dict[str, Any]:
    result: dict[str, Any] = await call(
        client, "create_task", {"title": title, "project_id": project_id, **fields}
    )
    return result


async def audit_rows(db: Database, entity_id: int) -> list[Any]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT action, changed_by FROM audit_entry WHERE entity_id = :id ORDER BY id"),
            {"id": entity_id},
        )
        return [tuple(row) for row in rows]


async def test_every_tool_describes_itself_and_its_parameters_and_declares_its_output(client: Client) -> None:
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == EXPECTED_TOOLS
    for tool in tools.values():
        assert tool.description and tool.title, tool.name
        assert tool.output_schema is not None, tool.name
        assert tool.input_schema.get("additionalProperties") is False, tool.name
        for name, schema in tool.input_schema.get("properties", {}).items():
            assert schema.get("description"), f"{tool.name}.{name} has no description"
        annotations = tool.annotations
        assert annotations is not None and annotations.open_world_hint is False, tool.name

    def hint(tool: str, name: str, absent: bool) -> bool:
        value = getattr(tools[tool].annotations, name)
        return absent if value is None else bool(value)  # an absent hint means the protocol's default

    assert hint("search_tasks", "read_only_hint", absent=False) is True
    assert hint("create_task", "read_only_hint", absent=False) is False
    assert hint("create_task", "destructive_hint", absent=True) is False
    assert hint("soft_delete_task", "destructive_hint", absent=True) is True
    assert hint("update_task", "idempotent_hint", absent=False) is True
    assert hint("create_task", "idempotent_hint", absent=False) is False


# Eleven tools took 2,500 tokens; the claim tools (claim, renew, release), the dependency tools
# (add, remove) and the comment tools (add, list) another 1,400; bulk delete and the project's
# rename, delete and restore another 800, revert_request 170, get_task_as_of 200, the changeset
# tools (apply, get, and a changeset in the bulk results) 420 (5,500 for 26 tools in the 2026 era,
# a little less in the handshake era). A deployment that needs fewer lists fewer (the `tools`
# setting).
CONTEXT_BUDGET_TOKENS = 5500


async def test_the_whole_tool_list_fits_the_context_budget(client: Client) -> None:
    """Every agent pays for the tool list in every conversation: its JSON, at about four
    characters a token, stays within the budget."""
    listed = (await client.list_tools()).model_dump(by_alias=True, mode="json", exclude_none=True)
    characters = len(json.dumps(listed, separators=(",", ":"), ensure_ascii=False))
    assert len(listed["tools"]) == len(EXPECTED_TOOLS)
    assert characters / 4 <= CONTEXT_BUDGET_TOKENS, f"tools/list is {characters / 4:.0f} tokens"


async def test_create_task_returns_it_with_its_project_and_audits_it_under_the_client_name(
    client: Client, db: Database
) -> None:
    project_id = await make_project(client)
    task = await make_task(client, project_id, "Write the launch plan", priority="high")
    assert task["project"] == {"id": project_id, "name": "Apollo"}
    assert task["status"] == "pending" and task["priority"] == "high"
    assert datetime.fromisoformat(task["created_at"]).utcoffset() == timedelta(0)
    trail = await call(client, "get_audit_trail", {"entity_id": task["id"]})
    [entry] = trail["items"]
    assert entry["action"] == "created" and entry["changed_by"] == AGENT
    assert "old_value" not in entry and "entity_id" not in entry  # the trail's entity is its header
    assert entry["new_value"]["title"] == "Write the launch plan"
    assert await audit_rows(db, task["id"]) == [("created", AGENT)]


async def test_a_tool_argument_cannot_set_changed_by(client: Client, db: Database) -> None:
    project_id = await make_project(client)
    before = await snapshot(db)
    message = await call_error(
        client, "create_task", {"title": "t", "project_id": project_id, "changed_by": "someone-else"}
    )
    assert "changed_by" in message
    assert await snapshot(db) == before
    task = await make_task(client, project_id)
    await call_error(client, "update_task", {"task_id": task["id"], "status": "blocked", "changed_by": "x"})
    assert await audit_rows(db, task["id"]) == [("created", AGENT)]


async def test_the_configured_agent_id_is_the_identity_and_the_client_name_is_kept_beside_it(
    settings: Settings, era: str
) -> None:
    async with connect(settings, era, name="planner-bot", client_name="something-else") as client:
        project_id = await make_project(client)
        trail = await call(client, "get_audit_trail", {"entity_id": project_id})
    assert [(e["changed_by"], e["client_name"]) for e in trail["items"]] == [
        ("planner-bot", "something-else")
    ]
    assert trail["entity"] == {"id": project_id, "type": "project", "name": "Apollo", "deleted": False}
    assert trail["items"][0]["new_value"] == {"name": "Apollo", "description": ""}


async def test_without_a_configured_agent_id_the_identity_is_the_local_user_not_the_client_name(
    settings: Settings, era: str
) -> None:
    unconfigured = settings.model_copy(update={"agent_id": None})
    info = Implementation(name="claims-to-be-admin", version="1")
    async with Client(create_server(unconfigured), mode=era, client_info=info) as client:  # type: ignore[arg-type]
        project_id = await make_project(client)
        trail = await call(client, "get_audit_trail", {"entity_id": project_id})
    assert [(e["changed_by"], e["client_name"]) for e in trail["items"]] == [
        (f"local:{getpass.getuser()}", "claims-to-be-admin")
    ]


async def test_update_task_audits_only_the_fields_that_changed_and_a_no_op_writes_nothing(
    client: Client, db: Database
) -> None:
    project_id = await make_project(client)
    other_project = await make_project(client, "Gemini")
    task = await make_task(client, project_id, "Draft", priority="low")
    updated = await call(
        client,
        "update_task",
        {"task_id": task["id"], "title": "Draft", "priority": "critical", "project_id": other_project},
    )
    assert updated["priority"] == "critical" and updated["project"]["name"] == "Gemini"
    latest = (await call(client, "get_audit_trail", {"entity_id": task["id"]}))["items"][0]
    assert latest["old_value"] == {"priority": "low", "project_id": project_id}
    assert latest["new_value"] == {"priority": "critical", "project_id": other_project}
    entries = await count_rows(db, "audit_entry")
    await call(client, "update_task", {"task_id": task["id"], "priority": "critical"})
    assert await count_rows(db, "audit_entry") == entries


async def test_soft_deleted_tasks_stay_out_of_every_default_read(client: Client, db: Database) -> None:
    project_id = await make_project(client)
    kept = await make_task(client, project_id, "kept")
    gone = await make_task(client, project_id, "gone")
    deleted = await call(client, "soft_delete_task", {"task_id": gone["id"]})
    assert deleted["deleted_at"] is not None

    page = await call(client, "search_tasks", {"include_total": True})
    assert [t["id"] for t in page["items"]] == [kept["id"]] and page["total"] == 1
    by_id = {"field": "id", "op": "eq", "value": gone["id"]}
    assert (await call(client, "search_tasks", {"filter": by_id}))["items"] == []
    assert "restore_task" in await call_error(client, "get_task", {"task_id": gone["id"]})
    await call_error(client, "update_task", {"task_id": gone["id"], "title": "x"})
    # Deleting is idempotent: a repeat changes nothing, records nothing, and shows the task as it is.
    assert await call(client, "soft_delete_task", {"task_id": gone["id"]}) == deleted
    await call_error(client, "bulk_update_status", {"status": "completed", "task_ids": [gone["id"]]})
    result = await call(client, "bulk_update_status", {"status": "completed", "filter": by_id})
    assert result["changed_count"] == 0

    with_deleted = await call(client, "search_tasks", {"filter": by_id, "include_deleted": True})
    assert [t["id"] for t in with_deleted["items"]] == [gone["id"]]

    restored = await call(client, "restore_task", {"task_id": gone["id"]})
    assert "deleted_at" not in restored
    assert await call(client, "restore_task", {"task_id": gone["id"]}) == restored  # so is restoring
    assert (await call(client, "get_task", {"task_id": gone["id"]}))["title"] == "gone"
    actions = [action for action, _ in await audit_rows(db, gone["id"])]
    assert actions == ["created", "deleted", "restored"]


async def test_bulk_update_status_changes_matching_live_tasks_with_one_audit_entry_each(
    client: Client, db: Database
) -> None:
    project_id = await make_project(client)
    pending = [await make_task(client, project_id, f"p{i}") for i in range(3)]
    done = await make_task(client, project_id, "already done", status="completed")
    other = await make_task(client, project_id, "blocked one", status="blocked")
    entries = await count_rows(db, "audit_entry")

    result = await call(
        client,
        "bulk_update_status",
        {"status": "completed", "filter": {"field": "status", "op": "in", "value": ["pending", "completed"]}},
    )
    assert result["changed_count"] == 3
    assert result["changed_ids"] == sorted(t["id"] for t in pending)
    assert result["changed_ids_truncated"] is False
    assert await count_rows(db, "audit_entry") == entries + 3
    trail = await call(client, "get_audit_trail", {"entity_id": pending[0]["id"]})
    latest = trail["items"][0]
    assert latest["old_value"] == {"status": "pending"} and latest["new_value"] == {"status": "completed"}
    assert latest["changed_by"] == AGENT and latest["request_id"] == result["request_id"]
    assert [a for a, _ in await audit_rows(db, done["id"])] == ["created"]
    assert (await call(client, "get_task", {"task_id": other["id"]}))["status"] == "blocked"
    assert (await call(client, "get_task", {"task_id": pending[1]["id"]}))["status"] == "completed"


async def test_bulk_update_by_ids_with_a_missing_id_changes_nothing(client: Client, db: Database) -> None:
    project_id = await make_project(client)
    task = await make_task(client, project_id)
    before = await snapshot(db)
    message = await call_error(
        client, "bulk_update_status", {"status": "blocked", "task_ids": [task["id"], 9999]}
    )
    assert "9999" in message
    assert await snapshot(db) == before


async def test_a_failing_bulk_update_leaves_neither_changes_nor_audit_entries(
    client: Client, db: Database
) -> None:
    project_id = await make_project(client)
    tasks = [await make_task(client, project_id, f"t{i}") for i in range(4)]
    # The database itself refuses to update the last task, after the audit rows were inserted
    # and some tasks may already have been updated by the same statement.
    async with db.engine.begin() as conn:
        if db.is_sqlite:
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse_update BEFORE UPDATE OF status ON entity "
                    f"WHEN NEW.id = {tasks[-1]['id']} BEGIN SELECT RAISE(ABORT, 'trigger-said-no'); END"
                )
            )
        else:
            await conn.execute(
                text(
                    "CREATE FUNCTION refuse_update() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'trigger-said-no'; END $$"
                )
            )
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse_update BEFORE UPDATE OF status ON entity FOR EACH ROW "
                    f"WHEN (NEW.id = {tasks[-1]['id']}) EXECUTE FUNCTION refuse_update()"
                )
            )
    try:
        before = await snapshot(db)
        message = await call_error(
            client, "bulk_update_status", {"status": "completed", "task_ids": [t["id"] for t in tasks]}
        )
        assert "nothing was changed" in message
        assert "trigger-said-no" not in message and "UPDATE" not in message
        assert await snapshot(db) == before
    finally:
        async with db.engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER refuse_update" + ("" if db.is_sqlite else " ON entity")))
            if not db.is_sqlite:
                await conn.execute(text("DROP FUNCTION refuse_update()"))
    # The server keeps serving, and the same call now succeeds whole.
    result = await call(
        client, "bulk_update_status", {"status": "completed", "task_ids": [t["id"] for t in tasks]}
    )
    assert result["changed_count"] == 4


async def test_search_pages_through_every_match_once_in_order(client: Client) -> None:
    project_id = await make_project(client)
    priorities = ["low", "medium", "high", "critical"]
    created = [
        await make_task(client, project_id, f"task {i:02d}", priority=priorities[i % 4]) for i in range(11)
    ]
    order = [{"field": "priority", "direction": "desc"}, {"field": "title", "direction": "asc"}]
    seen: list[dict[str, Any]] = []
    token = None
    while True:
        args: dict[str, Any] = {"order_by": order, "limit": 4}
        if token:
            args["page_token"] = token
        page = await call(client, "search_tasks", args)
        seen += page["items"]
        token = page.get("next_page_token")
        assert page["has_more"] == (token is not None)
        if not token:
            break
    expected = sorted(created, key=lambda t: (-priorities.index(t["priority"]), t["title"]))
    assert [t["id"] for t in seen] == [t["id"] for t in expected]

    default = await call(client, "search_tasks", {"limit": 3})
    assert [t["id"] for t in default["items"]] == [t["id"] for t in reversed(created)][:3]


async def test_a_page_token_only_works_with_the_query_that_issued_it(client: Client) -> None:
    project_id = await make_project(client)
    for i in range(3):
        await make_task(client, project_id, f"t{i}")
    page = await call(client, "search_tasks", {"limit": 1})
    other_query = {"limit": 1, "page_token": page["next_page_token"], "order_by": [{"field": "title"}]}
    assert "page_token" in await call_error(client, "search_tasks", other_query)
    assert "page_token" in await call_error(client, "search_tasks", {"page_token": "not-a-token"})
    # A hand-edited token (here: its time stripped of the offset) is refused as a token, too.
    data = json.loads(base64.urlsafe_b64decode(page["next_page_token"] + "=="))
    data["after"][0] = data["after"][0][:19]
    edited = base64.urlsafe_b64encode(json.dumps(data).encode()).decode()
    assert "page_token" in await call_error(client, "search_tasks", {"limit": 1, "page_token": edited})


async def test_get_audit_trail_is_newest_first_and_filters_by_agent_and_time(
    settings: Settings, era: str, db: Database
) -> None:
    async with connect(settings, era, name="alice") as alice:
        project_id = await make_project(alice)
        task = await make_task(alice, project_id)
    async with connect(settings, era, name="bob") as bob:
        for status in ("in_progress", "blocked", "completed"):
            await call(bob, "update_task", {"task_id": task["id"], "status": status})
        trail = await call(bob, "get_audit_trail", {"entity_id": task["id"], "limit": 2})
        assert [e["new_value"].get("status") for e in trail["items"]] == ["completed", "blocked"]
        rest = await call(
            bob, "get_audit_trail", {"entity_id": task["id"], "page_token": trail["next_page_token"]}
        )
        assert [e["action"] for e in rest["items"]] == ["updated", "created"] and not rest["has_more"]

        by_alice = await call(bob, "get_audit_trail", {"entity_id": task["id"], "changed_by": "alice"})
        assert [e["action"] for e in by_alice["items"]] == ["created"]
        created_at = by_alice["items"][0]["changed_at"]
        since = await call(bob, "get_audit_trail", {"entity_id": task["id"], "since": created_at})
        assert len(since["items"]) == 4
        until = await call(bob, "get_audit_trail", {"entity_id": task["id"], "until": created_at})
        assert until["items"] == []
        # A time without an offset is UTC, as in search filters.
        naive = created_at.removesuffix("Z")
        assert await call(bob, "get_audit_trail", {"entity_id": task["id"], "since": naive}) == since
        assert (await call(bob, "get_audit_trail", {"entity_id": task["id"], "until": naive}))["items"] == []
        assert "9999" in await call_error(bob, "get_audit_trail", {"entity_id": 9999})


async def test_project_names_are_unique_among_live_projects_only(client: Client, db: Database) -> None:
    first = await make_project(client, "Apollo")
    before = await snapshot(db)
    message = await call_error(client, "create_project", {"name": "Apollo"})
    assert f"a live project is named 'Apollo' (id {first})" in message
    assert await snapshot(db) == before
    async with db.engine.begin() as conn:  # soft-delete the project behind the server's back
        await conn.execute(
            text("UPDATE entity SET deleted_at = CURRENT_TIMESTAMP WHERE id = :id"), {"id": first}
        )
    second = await make_project(client, "Apollo")
    assert second != first
    listed = await call(client, "list_projects", {})
    assert [(p["id"], p["name"]) for p in listed["items"]] == [(second, "Apollo")]
    message = await call_error(client, "create_task", {"title": "t", "project_id": first})
    assert "list_projects" in message


# "Apollo" as it can be written to look the same: another case, full-width letters, a zero-width
# space, a Cyrillic A (U+0410) and o (U+043E), a Greek capital alpha, a soft hyphen.
LOOK_ALIKES = (
    "apollo",
    "\uff21\uff50\uff4f\uff4c\uff4c\uff4f",
    "Apo\u200bllo",
    "\u0410p\u043ello",
    "\u0391pollo",
    "Apol\u00adlo",
)


async def test_a_project_name_that_reads_like_a_live_ones_is_refused_naming_it(
    client: Client, db: Database
) -> None:
    apollo = await make_project(client, "Apollo")
    other = await make_project(client, "Gemini")
    before = await snapshot(db)
    for name in LOOK_ALIKES:
        for tool, arguments in (
            ("create_project", {"name": name}),
            ("rename_project", {"project_id": other, "name": name}),
        ):
            message = await call_error(client, tool, arguments)
            assert (
                f"a live project is named 'Apollo' (id {apollo}), and {name!r} reads the same" in message
            ), name
            assert "UTS #39" in message
    assert await snapshot(db) == before
    # A deleted project whose name reads like a live one's waits for a rename before it is restored.
    await call(client, "delete_project", {"project_id": other})
    await call(client, "create_project", {"name": "Gemini 2"})
    await call(client, "rename_project", {"project_id": apollo, "name": "G\u0435mini"})  # a Cyrillic ie
    clash = await call_error(client, "restore_project", {"project_id": other})
    assert f"a live project is named 'G\u0435mini' (id {apollo}), and 'Gemini' reads the same" in clash
    # Names that only share letters are different names; a project keeps its own look-alike name.
    assert (await call(client, "create_project", {"name": "Apollo 11"}))["name"] == "Apollo 11"
    renamed = await call(client, "rename_project", {"project_id": apollo, "name": "G\u0435m\u0456ni"})
    assert renamed["project"]["name"] == "G\u0435m\u0456ni"


async def test_list_projects_pages_by_name_and_filters_by_text(client: Client) -> None:
    for name in ["Zeta", "alpha", "Beta launch", "Gamma launch"]:
        await make_project(client, name)
    first = await call(client, "list_projects", {"limit": 2})
    second = await call(client, "list_projects", {"limit": 2, "page_token": first["next_page_token"]})
    names = [p["name"] for p in first["items"] + second["items"]]
    assert sorted(names) == sorted(["Zeta", "alpha", "Beta launch", "Gamma launch"]) and len(set(names)) == 4
    launch = await call(client, "list_projects", {"name_contains": "LAUNCH"})
    assert [p["name"] for p in launch["items"]] == ["Beta launch", "Gamma launch"]


async def test_search_after_and_before_compare_times_across_timezones(client: Client) -> None:
    project_id = await make_project(client)
    task = await make_task(client, project_id)
    created = datetime.fromisoformat(task["created_at"])
    just_before = (created - timedelta(seconds=1)).astimezone(UTC).replace(tzinfo=None).isoformat()
    in_tokyo = (created + timedelta(seconds=1)).astimezone(ZoneInfo("Asia/Tokyo")).isoformat()
    after = {"field": "created_at", "op": "after", "value": just_before}
    before = {"field": "created_at", "op": "before", "value": in_tokyo}
    page = await call(client, "search_tasks", {"filter": {"and": [after, before]}})
    assert [t["id"] for t in page["items"]] == [task["id"]]
    for op in ("before", "after"):  # strict: the task's own time is neither before nor after it
        exact = {"field": "created_at", "op": op, "value": task["created_at"]}
        assert (await call(client, "search_tasks", {"filter": exact}))["items"] == []


async def test_results_leave_out_fields_that_would_be_null(client: Client) -> None:
    project_id = await make_project(client)
    task = await make_task(client, project_id, "t")
    assert "deleted_at" not in task
    assert set(await call(client, "search_tasks", {})) == {
        "items",
        "has_more",
    }  # no total asked, no next page
    counted = await call(client, "search_tasks", {"include_total": True})
    assert (counted["total"], counted["total_exact"]) == (1, True)
    trail = await call(client, "get_audit_trail", {"entity_id": task["id"]})
    assert set(trail) == {"entity", "items", "has_more"}
    [created] = trail["items"]  # no old value, and no entity id beside the entity's own header
    assert set(created) == {
        "id",
        "action",
        "changed_by",
        "client_name",
        "changed_at",
        "request_id",
        "new_value",
    }
    everything = await call(client, "get_audit_trail", {})
    assert all("entity_id" in entry for entry in everything["items"])
