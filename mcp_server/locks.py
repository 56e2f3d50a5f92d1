"""Turns for PostgreSQL writers that must not overlap: a row lock on a `lock_slot` row, held to
the end of the transaction.

An advisory lock would do the same, but any role that can connect to the database can take an
advisory lock and hold it, stopping every writer that waits for it. A row of `lock_slot` can be
locked only by a role granted UPDATE on it: the server's roles. A key is hashed to one of a fixed
number of slots, so two keys rarely share a slot, and when they do they only take turns.
SQLite has one writer at a time, so there is nothing to take there.
"""

from __future__ import annotations

import zlib
from enum import IntEnum

from sqlalchemy import bindparam
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server.models import LockSlot


class Space(IntEnum):
    """What the slots of a space guard, and how many it has (the migration makes them)."""

    TITLES = 1  # creates of one title in one project (tasks.create_task's duplicate guard)
    GRAPH = 2  # the dependency graph as a whole (dependencies.py)
    PROJECT_NAMES = 3  # new and changed project names (projects.require_name_free)


SLOTS = {Space.TITLES: 1024, Space.GRAPH: 1, Space.PROJECT_NAMES: 1}

_SLOT = (
    select(LockSlot.slot)
    .where(col(LockSlot.space) == bindparam("space"), col(LockSlot.slot) == bindparam("slot"))
    .with_for_update()
)


def slot(space: Space, key: str) -> int:
    """The slot of `key` in `space`: the same in every process (CRC-32, not Python's salted hash)."""
    return zlib.crc32(key.encode()) % SLOTS[space]


async def take(session: AsyncSession, space: Space, key: str = "") -> None:
    """Wait for and hold `key`'s slot in `space` until the session's transaction ends (PostgreSQL)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    await session.exec(_SLOT, params={"space": int(space), "slot": slot(space, key)})
