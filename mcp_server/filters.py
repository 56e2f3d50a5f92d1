"""The filter language of search_tasks and bulk_update_status, and its compiler to SQL.

This module is the security boundary between agent input and SQL: fields and operators come from
the allow-list below, every value becomes a bound parameter of the column's type, and the size of
a tree is capped. It does no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date, datetime, time
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
)
from sqlalchemy import ColumnElement, and_, bindparam, func, or_

from mcp_server import graph
from mcp_server.errors import InvalidInputError
from mcp_server.models import LIVE_HOLDER, Priority, Task, TaskStatus
from mcp_server.schemas import MAX_ID, no_nul, utc
from mcp_server.sql import one_of

MAX_DEPTH = 4
MAX_NODES = 50
MAX_LIST_VALUES = 100
MAX_TEXT_LENGTH = 200


class FilterField(StrEnum):
    ID = "id"
    TITLE = "title"
    DESCRIPTION = "description"
    STATUS = "status"
    PRIORITY = "priority"
    PROJECT_ID = "project_id"
    CREATED_AT = "created_at"
    UPDATED_AT = "updated_at"
    DELETED_AT = "deleted_at"
    CLAIMED_BY = "claimed_by"
    READY = "ready"


class Operator(StrEnum):
    EQ = "eq"
    NE = "ne"
    IN = "in"
    CONTAINS = "contains"
    BEFORE = "before"
    AFTER = "after"
    IS_NULL = "is_null"


ScalarValue = str | int | bool
FilterValue = ScalarValue | list[str | int] | None


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: FilterField = Field(description="The task field to test.")
    op: Operator = Field(
        description=(
            "eq / ne: equal or not; in: equal to one of a list; contains: case-insensitive substring "
            "(title, description); before / after: strictly earlier / later than an ISO 8601 time "
            "(dates); is_null: value true or false (deleted_at)."
        )
    )
    value: FilterValue = Field(
        default=None,
        description="A value of the field's type; a list for `in`; true or false for `is_null`.",
    )


class AllOf(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    all_of: list[FilterNode] = Field(alias="and", min_length=1, description="Every node must match.")


class AnyOf(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    any_of: list[FilterNode] = Field(alias="or", min_length=1, description="At least one node must match.")


def _node_kind(node: Any) -> str | None:
    if isinstance(node, dict):
        if "and" in node:
            return "and"
        if "or" in node:
            return "or"
        return "condition"
    if isinstance(node, AllOf):
        return "and"
    if isinstance(node, AnyOf):
        return "or"
    return "condition" if isinstance(node, Condition) else None


FilterNode = Annotated[
    Annotated[Condition, Tag("condition")] | Annotated[AllOf, Tag("and")] | Annotated[AnyOf, Tag("or")],
    Discriminator(_node_kind),
]
AllOf.model_rebuild()
AnyOf.model_rebuild()


def _utc_datetime(value: Any) -> datetime:
    """ISO 8601 date or date-time; a time without an offset is taken as UTC."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            parsed = datetime.combine(date.fromisoformat(value), time())
        return utc(parsed)
    raise ValueError("not a string")


_Coerce = Callable[[Any], Any]


def _adapter(tp: Any) -> _Coerce:
    return TypeAdapter(tp).validate_python


_INT = _adapter(Annotated[int, Field(ge=-MAX_ID - 1, le=MAX_ID)])
_TEXT = _adapter(Annotated[str, Field(min_length=1, max_length=MAX_TEXT_LENGTH), AfterValidator(no_nul)])
_STATUS = _adapter(TaskStatus)
_PRIORITY = _adapter(Priority)
_BOOL = _adapter(bool)
_TRUE_OR_FALSE = "true or false"


class _FieldSpec:
    def __init__(self, column: Any, ops: set[Operator], coerce: _Coerce, expects: str) -> None:
        self.column: ColumnElement[Any] = column
        self.ops = ops
        self.coerce = coerce
        self.expects = expects


_EQUALITY = {Operator.EQ, Operator.NE, Operator.IN}
_TIME = {Operator.BEFORE, Operator.AFTER}
_ISO = "an ISO 8601 time such as 2026-01-31T09:00:00Z"

FIELDS: dict[FilterField, _FieldSpec] = {
    FilterField.ID: _FieldSpec(Task.id, _EQUALITY, _INT, "an integer id"),
    FilterField.TITLE: _FieldSpec(Task.title, _EQUALITY | {Operator.CONTAINS}, _TEXT, "text"),
    FilterField.DESCRIPTION: _FieldSpec(Task.description, {Operator.CONTAINS}, _TEXT, "text"),
    FilterField.STATUS: _FieldSpec(
        Task.status, _EQUALITY, _STATUS, "one of " + ", ".join(s.value for s in TaskStatus)
    ),
    FilterField.PRIORITY: _FieldSpec(
        Task.priority, _EQUALITY, _PRIORITY, "one of " + ", ".join(p.value for p in Priority)
    ),
    FilterField.PROJECT_ID: _FieldSpec(Task.project_id, _EQUALITY, _INT, "an integer project id"),
    FilterField.CREATED_AT: _FieldSpec(Task.created_at, _TIME, _utc_datetime, _ISO),
    FilterField.UPDATED_AT: _FieldSpec(Task.updated_at, _TIME, _utc_datetime, _ISO),
    FilterField.DELETED_AT: _FieldSpec(Task.deleted_at, _TIME | {Operator.IS_NULL}, _utc_datetime, _ISO),
    # The holder of a live claim (an expired one counts as none); the statement binds CLAIMS_NOW.
    FilterField.CLAIMED_BY: _FieldSpec(
        LIVE_HOLDER, {Operator.EQ, Operator.IN, Operator.IS_NULL}, _TEXT, "an agent's id"
    ),
    # Free to start: pending or in progress, unclaimed, waiting for nothing unfinished.
    FilterField.READY: _FieldSpec(graph.READY, {Operator.EQ}, _BOOL, _TRUE_OR_FALSE),
}


# What the SQL of a filter depends on: its groups, fields and operators, never its values. A
# condition's shape is (field, operator, is_null's flag); a group's is ("and" | "or", children).
Shape = tuple[Any, ...]


def parse(node: Condition | AllOf | AnyOf) -> tuple[Shape, dict[str, Any]]:
    """Check a filter tree and split it into its shape and its values, named f0, f1, ... in the
    order of the tree's conditions; InvalidInputError names the node that is wrong.

    Two calls that differ only in values share a shape, so the statement built from it can be
    kept and reused with new values (see `clause`). An `in` list is one value, however long.
    """
    values: dict[str, Any] = {}
    return _parse(node, "filter", 1, [0], values), values


@lru_cache(maxsize=512)
def clause(shape: Shape) -> ColumnElement[bool]:
    """The SQL condition of a shape, with one bound parameter per value `parse` found."""
    return _clause(shape, iter(range(MAX_NODES)))


def _parse(
    node: Condition | AllOf | AnyOf, path: str, depth: int, counter: list[int], values: dict[str, Any]
) -> Shape:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise InvalidInputError(f"the filter has more than {MAX_NODES} nodes; simplify it or split the query")
    if isinstance(node, Condition):
        return _parse_condition(node, path, values)
    if depth > MAX_DEPTH:
        raise InvalidInputError(
            f"{path}: groups nest deeper than {MAX_DEPTH} levels; flatten the filter "
            "(an `in` condition often replaces a group of `eq` conditions)"
        )
    key, children = ("and", node.all_of) if isinstance(node, AllOf) else ("or", node.any_of)
    return (
        key,
        tuple(
            _parse(child, f"{path}.{key}[{i}]", depth + 1, counter, values)
            for i, child in enumerate(children)
        ),
    )


def _parse_condition(cond: Condition, path: str, values: dict[str, Any]) -> Shape:
    spec = FIELDS[cond.field]
    where = f"{path} ({cond.field.value} {cond.op.value})"
    if cond.op not in spec.ops:
        allowed = ", ".join(sorted(op.value for op in spec.ops))
        raise InvalidInputError(f"{where}: operator not allowed on {cond.field.value}; allowed: {allowed}")
    value = cond.value
    name = f"f{len(values)}"
    if cond.op is Operator.IS_NULL:
        if not isinstance(value, bool):
            raise InvalidInputError(f"{where}: value must be true or false")
        return (cond.field, cond.op, value)
    if cond.op is Operator.IN:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_LIST_VALUES:
            raise InvalidInputError(f"{where}: value must be a list of 1 to {MAX_LIST_VALUES} values")
        values[name] = [_coerce(spec, item, where) for item in value]
        return (cond.field, cond.op, None)
    if isinstance(value, list) or value is None:
        raise InvalidInputError(f"{where}: value must be a single value ({spec.expects})")
    coerced = _coerce(spec, value, where)
    values[name] = escape_like(coerced) if cond.op is Operator.CONTAINS else coerced
    return (cond.field, cond.op, None)


_ESCAPE = "/"


def escape_like(text: str) -> str:
    """`text` for a LIKE with escape character /, so that %, _ and / match themselves, as
    SQLAlchemy's autoescape=True would make them."""
    return text.replace(_ESCAPE, _ESCAPE * 2).replace("%", _ESCAPE + "%").replace("_", _ESCAPE + "_")


def contains(column: Any, value: ColumnElement[str]) -> ColumnElement[bool]:
    """`column` holds `value` (escaped with escape_like), ignoring case: lower() on both sides and
    LIKE, which PostgreSQL runs faster than ILIKE, and SQLAlchemy's icontains is on SQLite."""
    return func.lower(column).contains(func.lower(value), escape=_ESCAPE)


def _clause(shape: Shape, names: Iterator[int]) -> ColumnElement[bool]:
    if shape[0] in ("and", "or"):
        parts = [_clause(child, names) for child in shape[1]]
        return and_(*parts) if shape[0] == "and" else or_(*parts)
    field, op, null = shape
    column = FIELDS[field].column
    if op is Operator.IS_NULL:
        return column.is_(None) if null else column.is_not(None)
    name = f"f{next(names)}"
    if op is Operator.IN:
        return one_of(column, name)
    value = bindparam(name, type_=column.type)
    match op:
        case Operator.EQ:
            return column == value
        case Operator.NE:
            return column != value
        case Operator.CONTAINS:
            return contains(column, value)
        case Operator.BEFORE:
            return column < value
        case _:
            return column > value


def _coerce(spec: _FieldSpec, value: Any, where: str) -> Any:
    if isinstance(value, bool) != (spec.expects == _TRUE_OR_FALSE):
        got = "a boolean" if isinstance(value, bool) else _preview(value)
        raise InvalidInputError(f"{where}: expected {spec.expects}, got {got}")
    try:
        return spec.coerce(value)
    except (ValidationError, ValueError, TypeError):
        raise InvalidInputError(f"{where}: expected {spec.expects}, got {_preview(value)}") from None


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
