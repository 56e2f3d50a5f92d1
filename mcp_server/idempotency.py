"""Idempotency keys: a retried write returns its first result instead of writing again.

The record is written in the same transaction as the change, so a call either committed its
change and its record, or neither. Writers take turns (see `Database.session`), so two retries
arriving together run one after the other: the second finds the first's record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

from pydantic_core import to_jsonable_python
from sqlmodel import col, delete
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server.errors import ConflictError
from mcp_server.models import IdempotencyRecord, utcnow

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
    record = await session.get(IdempotencyRecord, (agent_id, key))
    if record is not None and record.expires_at > now:
        if record.fingerprint != call:
            raise ConflictError(
                f"idempotency key {key!r} was already used at {record.created_at.isoformat()} for a "
                f"different call ({record.tool} with other arguments); nothing was changed. "
                "Use a new key for a new call"
            )
        stored: R = record.result  # type: ignore[assignment]  # the JSON of an R
        return stored
    # Expired records go here rather than in a background job, so they never outlive their use
    # (an expired record of this very key among them: the session forgets it as it deletes it).
    await session.exec(delete(IdempotencyRecord).where(col(IdempotencyRecord.expires_at) <= now))
    result = await run()
    session.add(
        IdempotencyRecord(
            agent_id=agent_id,
            key=key,
            tool=tool,
            fingerprint=call,
            result=to_jsonable_python(result),
            created_at=now,
            expires_at=now + ttl,
        )
    )
    return result
