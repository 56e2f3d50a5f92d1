"""Keyset paging behind opaque page tokens.

A page token holds the sort values of the last row served and a fingerprint of the query that
served it. The next page starts strictly after that row, so a page costs the same at any depth
and rows inserted or deleted meanwhile neither repeat nor vanish from later pages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, and_, bindparam, literal_column, or_, tuple_
from sqlalchemy.sql import Select

from mcp_server.errors import InvalidInputError
from mcp_server.schemas import MAX_ID

_TOKEN_ERROR = (
    "page_token is not valid for this query: pass the next_page_token of the previous page together "
    "with the same filter and ordering, or leave page_token out to start from the first page"
)


@dataclass(frozen=True)
class SortKey:
    """A sort key: the attribute `name` of the rows, its `column` in SQL, its direction, and how its
    value goes into a page token (`dump`, to JSON) and comes back out (`load`)."""

    name: str
    column: Any  # a mapped column attribute
    descending: bool
    dump: Callable[[Any], Any]
    load: Callable[[Any], Any]


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    rows: list[T]
    has_more: bool
    next_page_token: str | None


def load_time(value: str) -> datetime:
    """A time from a page token; tokens only ever hold times with an offset."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("time without an offset")
    return parsed


def load_id(value: Any) -> int:
    """An id from a page token, within the range an id column holds."""
    if type(value) is not int or not 0 < value <= MAX_ID:
        raise ValueError("not an id")
    return value


def fingerprint(*parts: Any) -> str:
    """A short digest of what defines a query, so a token cannot be replayed against another."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_token(keys: Sequence[SortKey], values: Sequence[Any], query: str) -> str:
    values = [key.dump(value) for key, value in zip(keys, values, strict=True)]
    blob = json.dumps({"q": query, "after": values}, separators=(",", ":"))
    return base64.urlsafe_b64encode(blob.encode()).decode().rstrip("=")


def decode_token(keys: Sequence[SortKey], token: str, query: str) -> list[Any]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if data["q"] != query or len(data["after"]) != len(keys):
            raise ValueError("token from another query")
        return [key.load(value) for key, value in zip(keys, data["after"], strict=True)]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidInputError(_TOKEN_ERROR) from None


def after(keys: Sequence[SortKey]) -> ColumnElement[bool]:
    """Rows that sort strictly after the values bound as after_0, after_1, ... in the order of `keys`."""
    # Typed binds, so each value is converted the way its column stores it.
    values = [bindparam(f"after_{i}", type_=key.column.type) for i, key in enumerate(keys)]
    if all(key.descending == keys[0].descending for key in keys):
        # One direction: a row-value comparison, which an index on the same columns serves directly.
        left = tuple_(*(key.column for key in keys))
        return left < tuple_(*values) if keys[0].descending else left > tuple_(*values)
    branches = []
    for i, key in enumerate(keys):
        equal_prefix = [keys[j].column == values[j] for j in range(i)]
        beyond = key.column < values[i] if key.descending else key.column > values[i]
        branches.append(and_(*equal_prefix, beyond))
    return or_(*branches)


def order(keys: Sequence[SortKey]) -> list[Any]:
    return [key.column.desc() if key.descending else key.column.asc() for key in keys]


S = TypeVar("S", bound=Select[Any])


def paged(statement: S, keys: Sequence[SortKey], *, first: bool, limit: int) -> S:
    """`statement` in key order, `limit` rows and one more (to learn whether more follow), and
    for a later page (not `first`) only the rows after the bound after_ values.

    The row count is written into the SQL rather than bound: a prepared statement whose LIMIT
    is a parameter looks expensive to PostgreSQL's planner in its generic form, so it is planned
    afresh on every call, while with the LIMIT written in, its generic plan is reused.
    """
    if not first:
        statement = statement.where(after(keys))
    return statement.order_by(*order(keys)).limit(literal_column(str(int(limit) + 1)))


def page_params(keys: Sequence[SortKey], *, page_token: str | None, query: str) -> dict[str, Any]:
    """The values a later page of a `paged` statement binds: the position it starts after."""
    if page_token is None:
        return {}
    values = decode_token(keys, page_token, query)
    return {f"after_{i}": value for i, value in enumerate(values)}


def cut(
    rows: Sequence[T],
    keys: Sequence[SortKey],
    *,
    limit: int,
    query: str,
    value: Callable[[T, str], Any] = getattr,
) -> Page[T]:
    """The page in `rows` (fetched from a `paged` statement) and the token of the next one. A row's
    value of a key is `value(row, key name)`: an attribute of a mapped object by default; for rows
    read as mappings, `operator.getitem`."""
    has_more = len(rows) > limit
    page = list(rows[:limit])
    token = None
    if has_more:
        token = encode_token(keys, [value(page[-1], key.name) for key in keys], query)
    return Page(rows=page, has_more=has_more, next_page_token=token)
