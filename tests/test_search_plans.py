"""The benchmark's search shapes and the audit trail read through an index, at every depth.

The statements checked are the ones the tools actually send (caught as they go to the driver),
explained by the database itself on enough rows that a sequential scan would be tempting.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, text

from mcp_server.config import Settings
from mcp_server.db import Database
from mcp_server.models import AuditEntry, Entity, Priority, TaskStatus
from tests.conftest import call, connect, statements_sent

pytestmark = pytest.mark.anyio

PROJECTS = 40
TASKS = 20_000
HOT_TASK = PROJECTS + 1
HOT_ENTRIES = 600

SHAPES = {
    "indexed and": {
        "and": [
            {"field": "status", "op": "eq", "value": "in_progress"},
            {"field": "priority", "op": "in", "value": ["high", "critical"]},
        ]
    },
    "or": {
        "or": [
            {"field": "status", "op": "eq", "value": "blocked"},
            {"field": "priority", "op": "eq", "value": "critical"},
        ]
    },
    "contains in a project": {
        "and": [
            {"field": "project_id", "op": "eq", "value": 7},
            {"field": "title", "op": "contains", "value": "deploy"},
        ]
    },
    # The shapes the benchmark did not measure before issue 12.
    "equal on two fields": {
        "and": [
            {"field": "status", "op": "eq", "value": "blocked"},
            {"field": "priority", "op": "eq", "value": "medium"},
        ]
    },
    "or across two fields": {
        "or": [
            {"field": "status", "op": "eq", "value": "cancelled"},
            {"field": "project_id", "op": "eq", "value": 13},
        ]
    },
    "contains in another project": {
        "and": [
            {"field": "project_id", "op": "eq", "value": 13},
            {"field": "title", "op": "contains", "value": "fix"},
        ]
    },
}
# The index a shape needs, where one was added for it.
NEEDS = {"equal on two fields": "ix_entity_status_priority_created"}
# PostgreSQL reads the first page of these in index order and stops once it is full, with no sort:
# that a title matches `contains` in one task of seven, it knows from its statistics on
# lower(title) (migration 0004); without them it guessed one match, read the whole project and
# sorted it.
IN_ORDER = {"contains in a project": "ix_entity_project_created"}


async def _load(db: Database) -> None:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    statuses = list(TaskStatus)
    priorities = list(Priority)
    projects = [
        {"id": p, "kind": "project", "title": f"P{p}", "created_at": t0, "updated_at": t0}
        for p in range(1, PROJECTS + 1)
    ]
    tasks = [
        {
            "id": PROJECTS + 1 + i,
            "kind": "task",
            "title": f"{'Deploy' if i % 7 == 0 else 'Fix'} thing {i}",
            "status": statuses[i % len(statuses)].value,
            "priority": priorities[(i // 5) % len(priorities)].value,
            "project_id": 1 + i % PROJECTS,
            "created_at": t0 + timedelta(minutes=i),
            "updated_at": t0 + timedelta(minutes=i),
        }
        for i in range(TASKS)
    ]
    entries = [
        {
            "entity_id": HOT_TASK if i < HOT_ENTRIES else HOT_TASK + i,
            "entity_type": "task",
            "action": "updated",
            "changed_by": "loader",
            "changed_at": t0 + timedelta(seconds=i),
            "request_id": f"r{i}",
            "new_value": {"status": "blocked"},
        }
        for i in range(2 * HOT_ENTRIES)
    ]
    async with db.engine.begin() as conn:
        # Raw table inserts: the priority column holds its rank, and times are bound as they are.
        entity = Entity.__table__  # type: ignore[attr-defined]
        await conn.execute(insert(entity), projects)
        await conn.execute(insert(entity), tasks)
        await conn.execute(insert(AuditEntry.__table__), entries)  # type: ignore[attr-defined]
        if not db.is_sqlite:
            await conn.execute(text("SELECT setval('entity_id_seq', (SELECT max(id) FROM entity))"))
    async with db.engine.connect() as conn:
        await conn.execute(text("ANALYZE"))
        await conn.commit()


@contextmanager
def _statements() -> Iterator[list[tuple[str, Any]]]:
    """Every SELECT of the entity table sent to a driver in the block, with its parameters."""
    with statements_sent() as sent:
        caught: list[tuple[str, Any]] = []
        yield caught
    caught += [
        (sql, args) for sql, args in sent if sql.lstrip().upper().startswith("SELECT") and "entity" in sql
    ]


async def _plan(db: Database, statement: str, parameters: Any) -> list[str]:
    """What the database says it will do: node and relation names (PostgreSQL) or detail lines (SQLite)."""
    async with db.engine.connect() as conn:
        if db.is_sqlite:
            rows = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)).all()
            return [row[-1] for row in rows]
        explain = "EXPLAIN (FORMAT JSON) " + statement
        raw = (await conn.exec_driver_sql(explain, tuple(parameters))).scalar_one()
    plan = json.loads(raw) if isinstance(raw, str) else raw
    nodes: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        names = (node.get("Relation Name", ""), node.get("Index Name", ""))
        nodes.append(" ".join((node["Node Type"], *names)).strip())
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return nodes


def _uses_an_index_and_never_scans(db: Database, plan: list[str]) -> bool:
    if db.is_sqlite:
        # Scanning an `in` list (one JSON parameter, read through json_each) or a page already
        # materialized from an index (the audit trail's entries) reads no table.
        not_tables = {"json_each", *(line.split()[1] for line in plan if line.startswith("MATERIALIZE"))}
        scans = [line for line in plan if line.startswith("SCAN") and line.split()[1] not in not_tables]
        searches = [line for line in plan if "USING" in line and ("INDEX" in line or "PRIMARY KEY" in line)]
        return bool(searches) and all("USING" in line for line in scans)
    indexed = [node for node in plan if "Index" in node]
    return bool(indexed) and not any(node.startswith("Seq Scan") for node in plan)


@pytest.mark.parametrize("shape", SHAPES)
async def test_each_search_shape_reads_through_an_index_on_its_first_and_a_later_page(
    settings: Settings, db: Database, shape: str
) -> None:
    await _load(db)
    arguments: dict[str, Any] = {"filter": SHAPES[shape], "limit": 50}
    async with connect(settings, "legacy") as client:
        with _statements() as first:
            page = await call(client, "search_tasks", arguments)
        assert page["has_more"], "the shape must match more than one page for the later page to mean anything"
        with _statements() as later:
            await call(client, "search_tasks", {**arguments, "page_token": page["next_page_token"]})
    assert len(first) == 1 and len(later) == 1
    for statement, parameters in first + later:
        plan = await _plan(db, statement, parameters)
        assert _uses_an_index_and_never_scans(db, plan), f"{shape}: {plan}"
        if shape in NEEDS:
            assert any(NEEDS[shape] in node for node in plan), f"{shape}: {plan}"
    if shape in IN_ORDER and not db.is_sqlite:
        plan = await _plan(db, *first[0])
        assert f"Index Scan entity {IN_ORDER[shape]}" in plan, f"{shape}: {plan}"
        assert not any(node.startswith("Sort") for node in plan), f"{shape}: {plan}"


async def test_the_audit_trail_of_one_task_reads_through_an_index(settings: Settings, db: Database) -> None:
    await _load(db)
    async with connect(settings, "legacy") as client:
        with _statements() as caught:
            trail = await call(client, "get_audit_trail", {"entity_id": HOT_TASK, "limit": 50})
    assert len(trail["items"]) == 50 and trail["has_more"]
    trail_statements = [(s, p) for s, p in caught if "audit_entry" in s]
    assert len(trail_statements) == 1
    for statement, parameters in caught:
        plan = await _plan(db, statement, parameters)
        assert _uses_an_index_and_never_scans(db, plan), plan
