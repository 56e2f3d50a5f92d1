"""The audit log's hash chain: sealed by the database on insert, walked by `verify`.

Each entry gets the next `seq`, the previous entry's hash as `prev_hash`, and `entry_hash` =
SHA-256 over `prev_hash` and its own content. The database does this in a trigger, so every
insert is sealed whichever code path wrote it, and set-based inserts stay set-based (the
triggers are created by the first migration, schema_versions/versions/0001). Writers are
serialized while they link (PostgreSQL: a transaction-level advisory lock, which every writing
transaction takes first; SQLite: one writer at a time already), so the chain never forks.

Other triggers refuse UPDATE, DELETE and TRUNCATE of audit rows. Someone who can disable the
triggers (a database superuser) can still edit rows; `verify` then finds the first entry whose
content, link or position does not match. Deleting the newest entries leaves a shorter valid
chain: compare the head that `verify` reports with one recorded elsewhere to catch that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NotRequired, cast

from pydantic import Field
from sqlalchemy import BigInteger, Integer, Row, bindparam, func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import Select
from typing_extensions import TypedDict

from mcp_server.models import AUDIT_TABLE, AuditEntry

GENESIS = "0" * 64
# Every writing transaction on PostgreSQL takes this advisory lock first (see db.Database.session).
CHAIN_LOCK_KEY = 7_243_017_110_398
BATCH = 5000

# The content an entry's hash covers, in order, after the previous entry's hash.
CONTENT = (
    "seq",
    "entity_id",
    "entity_type",
    "action",
    "changed_by",
    "client_name",
    "changed_at",
    "request_id",
    "old_value",
    "new_value",
)


def sqlite_entry_hash(prev_hash: str, *content: Any) -> str:
    """The SQLite side of the seal (its trigger calls this as audit_entry_hash, registered on
    each connection), over the values as SQLite stores them."""
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


class ChainProblem(TypedDict):
    seq: NotRequired[Annotated[int, Field(description="Its position; none when outside the chain.")]]
    id: Annotated[int, Field(description="The audit entry's id.")]
    problem: str


class ChainReport(TypedDict):
    ok: Annotated[bool, Field(description="Every entry matches its hash and links to the one before.")]
    entries_checked: int
    head_seq: NotRequired[Annotated[int, Field(description="Position of the newest entry checked.")]]
    head_hash: NotRequired[
        Annotated[str, Field(description="Hash of the newest entry: keep it elsewhere to detect a rewrite.")]
    ]
    first_problem: NotRequired[ChainProblem]


@dataclass
class _Walk:
    checked: int = 0
    seq: int = 0
    hash: str = GENESIS


async def verify(session: AsyncSession) -> ChainReport:
    """Walk the whole chain in order, a batch at a time, and stop at the first mismatch."""
    unsealed = (await session.exec(_UNSEALED)).first()
    if unsealed is not None:
        problem: ChainProblem = {
            "id": unsealed,
            "problem": "entry is outside the chain (inserted with the seal trigger off)",
        }
        return {"ok": False, "entries_checked": 0, "first_problem": problem}
    walk = _Walk()
    query = _VERIFY_QUERY[session.get_bind().dialect.name]
    while True:
        found = await session.exec(query, params={"after": walk.seq, "batch": BATCH})
        rows = cast(Sequence[Row[Any]], found.all())  # named rows; SQLModel types them as tuples
        for row in rows:
            mismatch = _check(walk, row.seq, row.prev_hash, row.entry_hash, row.computed)
            if mismatch is not None:
                return _report(walk, {"seq": row.seq, "id": row.id, "problem": mismatch})
            walk.checked += 1
            walk.seq, walk.hash = row.seq, row.entry_hash
        if len(rows) < BATCH:
            return _report(walk, None)


_UNSEALED = select(AuditEntry.id).where(col(AuditEntry.seq).is_(None)).order_by(col(AuditEntry.id)).limit(1)


def _verify_query(dialect: str) -> Select[*tuple[Any, ...]]:
    """A batch of entries after position `after`, each with the hash the database computes for it
    now: over the whole row on PostgreSQL, over the stored values on SQLite (see the triggers)."""
    if dialect == "postgresql":
        computed = func.audit_entry_hash(AUDIT_TABLE.table_valued())
    else:
        computed = func.audit_entry_hash(AUDIT_TABLE.c.prev_hash, *(AUDIT_TABLE.c[name] for name in CONTENT))
    entry = AUDIT_TABLE.c
    return (
        # Five columns: SQLModel's select() is typed for four at most, its Select class for any number.
        Select(entry.seq, entry.id, entry.prev_hash, entry.entry_hash, computed.label("computed"))
        .where(col(AuditEntry.seq) > bindparam("after", type_=BigInteger))
        .order_by(col(AuditEntry.seq))
        .limit(bindparam("batch", type_=Integer))
    )


_VERIFY_QUERY = {dialect: _verify_query(dialect) for dialect in ("postgresql", "sqlite")}


def _check(walk: _Walk, seq: int, prev_hash: str, entry_hash: str, computed: str) -> str | None:
    if seq != walk.seq + 1:
        missing = (
            f"entry {walk.seq + 1} is" if seq == walk.seq + 2 else f"entries {walk.seq + 1} to {seq - 1} are"
        )
        return f"{missing} missing: the chain jumps from {walk.seq} to {seq}"
    if prev_hash != walk.hash:
        return "entry does not link to the entry before it (prev_hash differs)"
    if computed != entry_hash:
        return "entry's content does not match its hash: it was changed after it was written"
    return None


def _report(walk: _Walk, problem: ChainProblem | None) -> ChainReport:
    report: ChainReport = {"ok": problem is None, "entries_checked": walk.checked}
    if walk.seq:
        report["head_seq"], report["head_hash"] = walk.seq, walk.hash
    if problem is not None:
        report["first_problem"] = problem
    return report
