"""SQL constructs SQLAlchemy lacks, compiled for each of the two databases. Pure: no I/O.

`one_of` compares a column with a list bound as one parameter, so a statement's SQL (and its
prepared form) never changes with the length of the list; `json_object` builds an audit value
inside a set-based statement; `iso_text` has the database write a time as the tools show it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ARRAY, JSON, Boolean, ColumnElement, Dialect, String, bindparam
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeDecorator, TypeEngine

from mcp_server.models import JSONValue


class json_object(FunctionElement[dict[str, Any]]):
    """`json_object(key, value, ...)`: jsonb_build_object on PostgreSQL, json_object on SQLite."""

    type = JSONValue  # type: ignore[assignment]  # JSON on SQLite, JSONB on PostgreSQL
    inherit_cache = True


@compiles(json_object, "postgresql")
def _json_object_pg(element: json_object, compiler: SQLCompiler, **kw: Any) -> str:
    return f"jsonb_build_object({compiler.process(element.clauses, **kw)})"


@compiles(json_object, "sqlite")
def _json_object_sqlite(element: json_object, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_object({compiler.process(element.clauses, **kw)})"


class iso_text(FunctionElement[str]):
    """A time column as text in the tools' format, RFC 3339 in UTC with microseconds
    (2026-08-02T16:46:40.000000Z, as schemas.iso_time writes it), written by the database: a page
    of rows then needs no time formatted in Python, the costliest part of building it."""

    type = String()
    inherit_cache = True


@compiles(iso_text, "postgresql")
def _iso_text_pg(element: iso_text, compiler: SQLCompiler, **kw: Any) -> str:
    time = compiler.process(element.clauses, **kw)
    return f"""to_char({time} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


@compiles(iso_text, "sqlite")
def _iso_text_sqlite(element: iso_text, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite holds a time as the text UTCDateTime binds: 2026-08-02 16:46:40.000000, in UTC.
    return f"replace({compiler.process(element.clauses, **kw)}, ' ', 'T') || 'Z'"


class ValueList(TypeDecorator[list[Any]]):
    """A list of values of `item_type` bound as one parameter: an array on PostgreSQL, JSON on SQLite."""

    impl = JSON
    cache_ok = True

    def __init__(self, item_type: TypeEngine[Any]) -> None:
        super().__init__()
        self.item_type = item_type

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(ARRAY(self.item_type))  # converts each item itself
        return dialect.type_descriptor(JSON())

    def process_bind_param(self, value: list[Any] | None, dialect: Dialect) -> list[Any] | None:
        if value is None or dialect.name == "postgresql":
            return value
        convert = self.item_type.dialect_impl(dialect).bind_processor(dialect)
        return value if convert is None else [convert(item) for item in value]


class one_of(ColumnElement[bool]):
    """`column` equals one of the values of the list bound as `name`: `= ANY($1)` on PostgreSQL,
    `IN (SELECT value FROM json_each(?))` on SQLite."""

    type = Boolean()
    inherit_cache = True
    _is_implicitly_boolean = True  # a comparison: SQLite needs no `= 1` after it
    _traverse_internals = [  # noqa: RUF012  -- SQLAlchemy's declaration of what a cache key covers
        ("column", InternalTraversal.dp_clauseelement),
        ("values", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: Any, name: str) -> None:  # a column, or a mapped attribute
        self.column: ColumnElement[Any] = column
        self.values = bindparam(name, type_=ValueList(column.type))


@compiles(one_of, "postgresql")
def _one_of_pg(element: one_of, compiler: SQLCompiler, **kw: Any) -> str:
    return f"{compiler.process(element.column, **kw)} = ANY({compiler.process(element.values, **kw)})"


@compiles(one_of, "sqlite")
def _one_of_sqlite(element: one_of, compiler: SQLCompiler, **kw: Any) -> str:
    column, values = compiler.process(element.column, **kw), compiler.process(element.values, **kw)
    return f"{column} IN (SELECT value FROM json_each({values}))"  # noqa: S608  -- compiled SQL, no values
