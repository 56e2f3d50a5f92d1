"""Idempotency keys: a retried write returns its first result instead of writing again.

The record is written in the same transaction as the change, so a call either committed its
change and its record, or neither. Writers take turns (see `Database.transaction`), so two
retries arriving together run one after the other: the second finds the first's record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from sqlalchemy import delete
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server.errors import ConflictError
from mcp_server.models import IdempotencyRecord, utcnow

M = TypeVar("M", bound=BaseModel)


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
    result_type: type[M],
    ttl: timedelta,
    run: Callable[[], Awaitable[M]],
) -> M:
    """`run()`'s result, or the stored result of the first call made with this agent's `key`."""
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
        return result_type.model_validate(record.result)
    # Expired records go here rather than in a background job, so they never outlive their use.
    await session.exec(delete(IdempotencyRecord).where(col(IdempotencyRecord.expires_at) <= now))
    result = await run()
    session.add(
        IdempotencyRecord(
            agent_id=agent_id,
            key=key,
            tool=tool,
            fingerprint=call,
            result=result.model_dump(mode="json"),
            created_at=now,
            expires_at=now + ttl,
        )
    )
    return result
