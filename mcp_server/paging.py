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

from sqlalchemy import ColumnElement, Select, and_, bindparam, or_, tuple_
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from mcp_server.errors import InvalidInputError

_TOKEN_ERROR = (
    "page_token is not valid for this query: pass the next_page_token of the previous page together "
    "with the same filter and ordering, or leave page_token out to start from the first page"
)


@dataclass(frozen=True)
class SortKey:
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


def fingerprint(*parts: Any) -> str:
    """A short digest of what defines a query, so a token cannot be replayed against another."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_token(keys: Sequence[SortKey], row: Any, query: str) -> str:
    values = [key.dump(getattr(row, key.name)) for key in keys]
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


Statement = TypeVar("Statement", SelectOfScalar[Any], Select[Any])


def paged(statement: Statement, keys: Sequence[SortKey], *, first: bool) -> Statement:
    """`statement` in key order, as many rows as the bound page_limit, and for a later page (not
    `first`) only the rows after the bound after_ values. Built once and kept, a paged statement
    skips SQLAlchemy's statement building and cache-key work on every call after the first."""
    if not first:
        statement = statement.where(after(keys))
    return statement.order_by(*order(keys)).limit(bindparam("page_limit"))


async def fetch_page(
    session: AsyncSession,
    statement: SelectOfScalar[Any] | Select[Any],
    keys: Sequence[SortKey],
    *,
    params: dict[str, Any],
    limit: int,
    page_token: str | None,
    query: str,
) -> Page[Any]:
    """One page of a statement from `paged(..., first=page_token is None)`, its filter's values in
    `params`. It fetches one row more than the page, to learn whether more follow."""
    params = {**params, "page_limit": limit + 1}
    if page_token is not None:
        values = decode_token(keys, page_token, query)
        params |= {f"after_{i}": value for i, value in enumerate(values)}
    rows: list[Any] = list((await session.exec(statement, params=params)).all())  # type: ignore[arg-type]
    has_more = len(rows) > limit
    rows = rows[:limit]
    token = encode_token(keys, rows[-1], query) if has_more else None
    return Page(rows=rows, has_more=has_more, next_page_token=token)
