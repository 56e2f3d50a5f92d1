"""Idempotency keys: a retried write returns its first result instead of writing again.

The record is written in the same transaction as the change, so a call either committed its
change and its record, or neither. A call claims its key first, by inserting the record: two
retries arriving together then meet on the key's primary key, where the second waits until the
first commits (and replays its result) or rolls back (and claims the key itself).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

from pydantic_core import to_jsonable_python
from sqlalchemy import bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col, delete
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server.errors import ConflictError
from mcp_server.models import IdempotencyRecord, JSONValue, utcnow

R = TypeVar("R", bound=Mapping[str, Any])


def fingerprint(tool: str, arguments: dict[str, Any]) -> str:
    canonical = json.dumps([tool, to_jsonable_python(arguments, by_alias=True)], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def once(
    session: AsyncSession,
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
    # Expired records go here rather than in a background job, so they never outlive their use
    # (an expired record of this very key among them).
    await session.exec(delete(IdempotencyRecord).where(col(IdempotencyRecord.expires_at) <= now))
    claim = {
        "agent_id": agent_id,
        "key": key,
        "tool": tool,
        "fingerprint": call,
        "result": {},  # replaced before the transaction commits
        "created_at": now,
        "expires_at": now + ttl,
    }
    claimed = (await session.exec(_CLAIM[session.get_bind().dialect.name], params=claim)).first()
    if claimed is None:
        # Another call holds the key and committed: what it stored is now visible.
        record = await session.get(IdempotencyRecord, (agent_id, key), populate_existing=True)
        assert record is not None, "a key held by a committed call has its record"
        if record.fingerprint != call:
            raise ConflictError(
                f"idempotency key {key!r} was already used at {record.created_at.isoformat()} for a "
                f"different call ({record.tool} with other arguments); nothing was changed. "
                "Use a new key for a new call"
            )
        stored: R = record.result  # type: ignore[assignment]  # the JSON of an R
        return stored
    result = await run()
    await session.exec(
        _STORE, params={"held_by": agent_id, "held_key": key, "result": to_jsonable_python(result)}
    )
    return result


def _claim(dialect_insert: Any) -> Any:
    return (
        dialect_insert(IdempotencyRecord)
        .on_conflict_do_nothing(index_elements=["agent_id", "key"])
        .returning(col(IdempotencyRecord.key))
    )


_CLAIM = {"postgresql": _claim(postgresql.insert), "sqlite": _claim(sqlite.insert)}
_STORE = (
    update(IdempotencyRecord)
    .where(
        col(IdempotencyRecord.agent_id) == bindparam("held_by"),
        col(IdempotencyRecord.key) == bindparam("held_key"),
    )
    .values(result=bindparam("result", type_=JSONValue))
)
