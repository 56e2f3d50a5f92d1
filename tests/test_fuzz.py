"""Generated bad input against every tool through the protocol: no crash, no change, no leak.

Figures for the whole run are printed at the end of the pytest output (see conftest.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.server.mcpserver.tools import Tool
from mcp.types import TextContent

from mcp_server.db import Database
from mcp_server.errors import REFUSED_MESSAGE
from mcp_server.server import TOOLS
from tests.conftest import FUZZ_TALLY, snapshot
from tests.test_tools import make_project, make_task

pytestmark = pytest.mark.anyio

INJECTIONS = [
    "'; DROP TABLE entity; --",
    "1 OR 1=1",
    '" OR ""="',
    "%' OR '1'='1",
    "1); DELETE FROM audit_entry; --",
    "$$; TRUNCATE audit_entry; $$",
    "' UNION SELECT entry_hash FROM audit_entry --",
    "entity.id",
    "title; --",
    "__class__",
]
ODD_TEXT = [
    "\x00",
    "a\x00b",
    "\u202eevil",
    "\U0001d518\U0001d52b\U0001d526",
    "\ufeff",
    "\t\n\r",
    "\U0001f642" * 60,
    "\x7f\x1b[31m",
    "\uff21",  # fullwidth A
    "e\u0301",
    " ",
    "",
]
# Strings the server must never show an agent: its own SQL, driver names, tracebacks.
LEAKS = [
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "sqlite3.",
    "[SQL:",
    "Traceback",
    "Background on this error",
    "entity.deleted_at",
    "audit_entry.seq",
    "postgresql+asyncpg",
    "sqlite+aiosqlite",
]
FIELDS = [
    "id",
    "project_id",
    "title",
    "description",
    "status",
    "priority",
    "created_at",
    "updated_at",
    "deleted_at",
]
OPS = ["eq", "ne", "in", "contains", "before", "after", "is_null"]

odd_strings = st.sampled_from(INJECTIONS + ODD_TEXT) | st.text(max_size=40)
oversized = st.integers(min_value=201, max_value=20_000).map(lambda n: "x" * n)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    odd_strings,
    oversized,
)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_strings, inner, max_size=3),
    max_leaves=8,
)


def deep(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"field": "id", "op": "eq", "value": 1}
    for _ in range(depth):
        node = {"and": [node]}
    return node


conditions = st.fixed_dictionaries(
    {
        "field": st.sampled_from(FIELDS) | odd_strings,
        "op": st.sampled_from(OPS) | odd_strings,
        "value": junk
        | st.sampled_from(["pending", "2026-01-01T00:00:00Z", True])
        | st.lists(scalars, max_size=3),
    }
)
filters = st.recursive(
    conditions | junk,
    lambda inner: st.dictionaries(
        st.sampled_from(["and", "or"]) | odd_strings, st.lists(inner, max_size=4), max_size=2
    ),
    max_leaves=12,
) | st.sampled_from(
    [
        deep(5),
        deep(40),
        {"or": [{"field": "id", "op": "eq", "value": i} for i in range(60)]},
        {"field": "id", "op": "in", "value": list(range(101))},
    ]
)
ids = st.integers(min_value=-5, max_value=10) | st.integers(min_value=2**31, max_value=2**70) | junk


def value_for(name: str) -> st.SearchStrategy[Any]:
    if name == "filter":
        return filters
    if name.endswith("_id") or name == "expected_version":
        return ids
    if name in ("task_ids", "order_by"):
        return st.lists(ids | junk, max_size=5) | junk
    if name in ("limit",):
        return st.integers(min_value=-10, max_value=10_000) | junk
    return junk | odd_strings | oversized


# Every tool's parameter names, as its input schema lists them.
PARAMETERS = {
    fn.__name__: list(Tool.from_function(fn, context_kwarg="request").parameters["properties"])
    for fn, _, _ in TOOLS
}


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    tool = draw(st.sampled_from(sorted(PARAMETERS)))
    names = PARAMETERS[tool]
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names))) if names else []
    arguments = {name: draw(value_for(name)) for name in chosen}
    if draw(st.booleans()):
        arguments |= draw(
            st.dictionaries(st.sampled_from([*INJECTIONS, "changed_by", "agent_id"]), junk, max_size=2)
        )
    return tool, arguments


fuzz_settings = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@pytest.fixture
async def seeded(client: Client, era: str) -> None:
    if era != "legacy":
        pytest.skip("one protocol era is enough for input validation; both run the same handlers")
    listed = {tool.name: list(tool.input_schema["properties"]) for tool in (await client.list_tools()).tools}
    assert listed == PARAMETERS
    project = await make_project(client)
    for i in range(3):
        await make_task(client, project, f"task {i}")


@fuzz_settings
@given(call=calls())
async def test_generated_bad_input_never_crashes_changes_or_leaks(
    client: Client, db: Database, seeded: None, call: tuple[str, dict[str, Any]]
) -> None:
    tool, arguments = call
    before = await snapshot(db)
    result = await client.call_tool(tool, arguments)
    FUZZ_TALLY["inputs tried"] += 1
    message = " ".join(block.text for block in result.content if isinstance(block, TextContent))
    # Hypothesis also draws strings found in this module (the LEAKS among them); pydantic's errors
    # quote the agent's own input back, which is no leak.
    sent = repr(arguments)
    assert not any(marker in message and marker not in sent for marker in LEAKS), f"{tool} leaked: {message}"
    if not result.is_error:
        FUZZ_TALLY["accepted (valid after all)"] += 1
        return
    FUZZ_TALLY["rejected"] += 1
    # A crash is an error the server did not anticipate: the SDK's bare message, or ours for a
    # database failure that is not the caller's doing.
    assert message.strip() != f"Error executing tool {tool}", f"{tool} crashed on {arguments!r}"
    assert REFUSED_MESSAGE not in message, f"{tool}: the database refused {arguments!r}"
    assert await snapshot(db) == before, f"a rejected {tool} call changed rows: {arguments!r}"
    assert not (await client.call_tool("list_projects", {})).is_error, "the server stopped serving"
