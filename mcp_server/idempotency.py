"""Idempotency keys: a retried write returns its first result instead of writing again.

The record is written in the same transaction as the change, so a call either committed its
change and its record, or neither. Writers take turns (see `Database.connect`), so two retries
arriving together run one after the other: the second finds the first's record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

from pydantic_core import to_jsonable_python
from sqlalchemy import bindparam, delete, insert
from sqlalchemy import select as sql_select

from mcp_server.db import Conn
from mcp_server.errors import ConflictError
from mcp_server.models import IdempotencyRecord, utcnow

R = TypeVar("R", bound=Mapping[str, Any])

_keys = IdempotencyRecord.__table__  # type: ignore[attr-defined]  # SQLModel does not declare it
_FIND = sql_select(
    _keys.c.tool, _keys.c.fingerprint, _keys.c.result, _keys.c.created_at, _keys.c.expires_at
).where(_keys.c.agent_id == bindparam("agent_id"), _keys.c.key == bindparam("key"))
_PURGE = delete(_keys).where(_keys.c.expires_at <= bindparam("now"))
# (A bound value in an INSERT may not be named after a column, hence the prefixes.)
_STORE = insert(_keys).values(
    agent_id=bindparam("store_agent_id"),
    key=bindparam("store_key"),
    tool=bindparam("store_tool"),
    fingerprint=bindparam("store_fingerprint"),
    result=bindparam("store_result"),
    created_at=bindparam("now"),
    expires_at=bindparam("store_expires_at"),
)


def fingerprint(tool: str, arguments: dict[str, Any]) -> str:
    canonical = json.dumps([tool, to_jsonable_python(arguments, by_alias=True)], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def once(
    conn: Conn,
    *,
    agent_id: str,
    key: str,
    tool: str,
    arguments: dict[str, Any],
    ttl: timedelta,
    run: Callable[[], Awaitable[R]],
) -> R:
    """`run()`'s result, or the stored result of the first call made with this agent's `key`.

    A stored result comes back as the JSON it was stored as (times as ISO 8601 text), which is
    what the tool returns either way.
    """
    now = utcnow()
    call = fingerprint(tool, arguments)
    record = await conn.row(_FIND, {"agent_id": agent_id, "key": key})
    if record is not None:
        stored_tool, stored_call, result, created_at, expires_at = record
        if expires_at > now:
            if stored_call != call:
                raise ConflictError(
                    f"idempotency key {key!r} was already used at {created_at.isoformat()} for a "
                    f"different call ({stored_tool} with other arguments); nothing was changed. "
                    "Use a new key for a new call"
                )
            stored: R = result
            return stored
    # Expired records go here rather than in a background job, so they never outlive their use.
    await conn.execute(_PURGE, {"now": now})
    result = await run()
    await conn.execute(
        _STORE,
        {
            "store_agent_id": agent_id,
            "store_key": key,
            "store_tool": tool,
            "store_fingerprint": call,
            "store_result": to_jsonable_python(result),
            "now": now,
            "store_expires_at": now + ttl,
        },
    )
    return result
