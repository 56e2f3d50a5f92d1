"""The filter language gives the same answer as a plain Python evaluation of the same tree."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

from mcp_server.db import Database
from mcp_server.models import Priority, Project, Task, TaskStatus
from tests.conftest import call

pytestmark = pytest.mark.anyio

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
# ASCII only: SQLite's lower() folds ASCII case alone. '%' and '_' check that LIKE wildcards are escaped.
ALPHABET = "abcAB _%"
STATUSES = [s.value for s in TaskStatus]
PRIORITIES = [p.value for p in Priority]


async def seed(db: Database, count: int = 60) -> None:
    rng = random.Random(20261125)
    async with db.session(write=True) as session:
        projects = [Project(title=f"project {i}", created_at=EPOCH, updated_at=EPOCH) for i in range(3)]
        session.add_all(projects)
        await session.flush()
        for i in range(count):
            created = EPOCH + timedelta(hours=i)
            session.add(
                Task(
                    title="".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6))),
                    description="".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6))),
                    status=rng.choice(STATUSES),
                    priority=rng.choice(PRIORITIES),
                    project_id=rng.choice(projects).id,
                    created_at=created,
                    updated_at=created + timedelta(minutes=rng.randint(0, 600)),
                    deleted_at=created + timedelta(hours=1) if rng.random() < 0.2 else None,
                )
            )


# On the hour (equal to a created_at) or half past, so `before`/`after` are checked at the boundary.
times = st.builds(
    lambda h, m: (EPOCH + timedelta(hours=h, minutes=m)).isoformat(),
    st.integers(min_value=-2, max_value=64),
    st.sampled_from([0, 30]),
)
ids = st.integers(min_value=1, max_value=70)
text = st.text(alphabet=ALPHABET, min_size=1, max_size=3)


def cond(field: str, op: str, value: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return value.map(lambda v: {"field": field, "op": op, "value": v})


def conditions() -> st.SearchStrategy[dict[str, Any]]:
    # Grouped by kind of field, since one_of picks its branches evenly.
    numbers = st.one_of(
        *(cond(f, op, ids) for f in ("id", "project_id") for op in ("eq", "ne")),
        cond("id", "in", st.lists(ids, min_size=1, max_size=5)),
    )
    choices = st.one_of(
        *(cond("status", op, st.sampled_from(STATUSES)) for op in ("eq", "ne")),
        cond("status", "in", st.lists(st.sampled_from(STATUSES), min_size=1, max_size=3)),
        *(cond("priority", op, st.sampled_from(PRIORITIES)) for op in ("eq", "ne")),
        cond("priority", "in", st.lists(st.sampled_from(PRIORITIES), min_size=1, max_size=3)),
    )
    texts = st.one_of(
        *(cond("title", op, text) for op in ("eq", "ne", "contains")),
        cond("title", "in", st.lists(text, min_size=1, max_size=3)),
        cond("description", "contains", text),
    )
    times_ = st.one_of(
        *(
            cond(f, op, times)
            for f in ("created_at", "updated_at", "deleted_at")
            for op in ("before", "after")
        ),
        cond("deleted_at", "is_null", st.booleans()),
    )
    return st.one_of(numbers, choices, texts, times_)


trees = st.recursive(
    conditions(),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=4).map(lambda nodes: {"and": nodes}),
        st.lists(children, min_size=1, max_size=4).map(lambda nodes: {"or": nodes}),
    ),
    max_leaves=12,
)


def matches(node: dict[str, Any], task: dict[str, Any]) -> bool:
    """The plain meaning of a filter tree, written independently of the compiler."""
    if "and" in node:
        return all(matches(child, task) for child in node["and"])
    if "or" in node:
        return any(matches(child, task) for child in node["or"])
    field, op, value = node["field"], node["op"], node["value"]
    actual = (
        task["project"]["id"] if field == "project_id" else task.get(field)
    )  # a live task has no deleted_at
    if op == "is_null":
        return (actual is None) == value
    if op in ("before", "after"):
        if actual is None:
            return False
        actual_time, bound = datetime.fromisoformat(actual), datetime.fromisoformat(value)
        return actual_time < bound if op == "before" else actual_time > bound
    if op == "contains":
        return value.lower() in actual.lower()
    if op == "in":
        return actual in value
    return (actual == value) if op == "eq" else (actual != value)


property_settings = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
async def everything(client: Client, db: Database) -> list[dict[str, Any]]:
    await seed(db)
    page = await call(
        client, "search_tasks", {"include_deleted": True, "limit": 100, "order_by": [{"field": "id"}]}
    )
    assert len(page["items"]) == 60
    return list(page["items"])


@property_settings
@given(tree=trees, include_deleted=st.booleans())
async def test_search_results_equal_a_python_evaluation_of_the_filter(
    client: Client, everything: list[dict[str, Any]], tree: dict[str, Any], include_deleted: bool
) -> None:
    page = await call(
        client,
        "search_tasks",
        {"filter": tree, "include_deleted": include_deleted, "limit": 100, "order_by": [{"field": "id"}]},
    )
    expected = [
        t["id"] for t in everything if matches(tree, t) and (include_deleted or "deleted_at" not in t)
    ]
    assert [t["id"] for t in page["items"]] == expected
