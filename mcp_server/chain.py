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

# ruff: noqa: S608  -- the SQL below is constant text built from constants; no value is ever interpolated
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, NotRequired

from pydantic import Field
from sqlalchemy import BigInteger, Integer, bindparam, text
from typing_extensions import TypedDict

if TYPE_CHECKING:  # db imports this module
    from mcp_server.db import Conn

GENESIS = "0" * 64
# Every writing transaction on PostgreSQL takes this advisory lock first (see db.py).
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


async def verify(conn: Conn) -> ChainReport:
    """Walk the whole chain in order, a batch at a time, and stop at the first mismatch."""
    unsealed = await conn.row(_UNSEALED)
    if unsealed is not None:
        problem: ChainProblem = {
            "id": unsealed[0],
            "problem": "entry is outside the chain (inserted with the seal trigger off)",
        }
        return {"ok": False, "entries_checked": 0, "first_problem": problem}
    walk = _Walk()
    query = _VERIFY_QUERY["sqlite" if conn.is_sqlite else "postgresql"]
    while True:
        rows = await conn.rows(query, {"after": walk.seq, "batch": BATCH})
        for seq, id, prev_hash, entry_hash, computed in rows:
            mismatch = _check(walk, seq, prev_hash, entry_hash, computed)
            if mismatch is not None:
                return _report(walk, {"seq": seq, "id": id, "problem": mismatch})
            walk.checked += 1
            walk.seq, walk.hash = seq, entry_hash
        if len(rows) < BATCH:
            return _report(walk, None)


_UNSEALED = text("SELECT id FROM audit_entry WHERE seq IS NULL ORDER BY id LIMIT 1")
_AFTER = (bindparam("after", type_=BigInteger), bindparam("batch", type_=Integer))
_VERIFY_QUERY = {
    "postgresql": text(
        "SELECT seq, id, prev_hash, entry_hash, audit_entry_hash(a) AS computed FROM audit_entry a "
        "WHERE seq > :after ORDER BY seq LIMIT :batch"
    ).bindparams(*_AFTER),
    "sqlite": text(
        "SELECT seq, id, prev_hash, entry_hash, "
        f"audit_entry_hash(prev_hash, {', '.join(CONTENT)}) AS computed FROM audit_entry "
        "WHERE seq > :after ORDER BY seq LIMIT :batch"
    ).bindparams(*_AFTER),
}


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
