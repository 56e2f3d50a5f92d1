"""The audit log's hash chain: rows stamped as they are written, sealed after they commit, walked
by `verify`.

Writing: a trigger stamps each inserted audit row with the transaction that wrote it (`txid`)
and `row_hash`, a SHA-256 of its content. Writers take no shared lock, so they never wait for
each other (schema_versions/versions/0005).

Sealing: a sealer (`seal`, run in a loop by sealer.py) gives committed rows their position `seq`
and links each to the one before: `entry_hash` = `link_hash(prev_hash, seq, entry id,
row_hash)`, one `AuditSeal` row each. It seals in the order it sees rows committed: on
PostgreSQL, every round takes the rows committed since the last one, ordered by id (drawn while
the row an entry records is locked, so the entries of one task keep the order of its changes);
it never passes a row an unfinished transaction may still write, because its horizon only moves
up to the oldest transaction still running. On SQLite one writer at a time means ids commit in
order, so it seals by id. One sealer at a time holds the lease in `AuditChain`'s row; the row is
also locked for the round, so two sealers can never fork the chain.

Verifying: `verify` walks the chain from the first entry, recomputing each entry's content hash
in the database, and stops at the first entry whose content, link or position does not match.
Entries written before version 0005 keep the seal they were given on insert (their own `seq`,
`prev_hash` and `entry_hash` columns); the chain runs on from the newest of them.

Triggers refuse UPDATE, DELETE and TRUNCATE of audit rows, seals and checkpoints. Someone who can
switch the triggers off (a superuser) can still edit rows; `verify` then finds it. Rewriting the
whole chain after an edit, or deleting its newest entries, leaves a chain that is valid in
itself: signed checkpoints kept outside the database (checkpoints.py) catch that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, NotRequired, cast

from pydantic import Field
from sqlalchemy import BigInteger, Integer, Row, Text, bindparam, exists, func, insert
from sqlalchemy import select as sql_select  # a Core SELECT of unnested arrays
from sqlalchemy.dialects.postgresql import ARRAY
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import Select
from typing_extensions import TypedDict

from mcp_server.checkpoints import Checkpoint, CheckpointKeys
from mcp_server.models import (
    AUDIT_TABLE,
    SEAL_TABLE,
    AuditChain,
    AuditCheckpoint,
    AuditEntry,
    AuditSeal,
    UTCDateTime,
    utcnow,
)

GENESIS = "0" * 64
BATCH = 5000

# What an audit row says, as the writer gives it; both hashes cover these columns, in this order.
CONTENT = (
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
# An entry sealed before version 0005: its position, then its content, after the previous hash.
LEGACY_CONTENT = ("seq", *CONTENT)
# What `row_hash` covers: the row's id and writing transaction, then its content (SQLite's
# audit_row_hash takes these arguments).
ROW_CONTENT = ("id", "txid", *CONTENT)


def link_hash(prev_hash: str, seq: int, entry_id: int, row_hash: str | None) -> str:
    """An entry's hash in the chain: its position, its row and its content after the previous hash."""
    return hashlib.sha256(f"{prev_hash}|{seq}|{entry_id}|{row_hash}".encode()).hexdigest()


def sqlite_entry_hash(prev_hash: str, *content: Any) -> str:
    """SQLite's hash of an entry sealed before version 0005 (registered on each connection as
    audit_entry_hash), over the values as SQLite stores them."""
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def sqlite_row_hash(*content: Any) -> str:
    """SQLite's row hash (registered on each connection as audit_row_hash), over ROW_CONTENT as
    SQLite stores it."""
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


# --- sealing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    """What one sealing round did."""

    sealed: int
    head_seq: int
    head_hash: str
    oldest: datetime | None  # when the oldest entry sealed was written
    more: bool  # it stopped at its batch size with entries left


_CHAIN_ROW = select(AuditChain).where(col(AuditChain.id) == 1).with_for_update()
_XMIN = select(func.pg_snapshot_xmin(func.pg_current_snapshot()).cast(Text).cast(BigInteger))
_SEALED = exists().where(col(AuditSeal.entry_id) == col(AuditEntry.id))
_CANDIDATE_COLUMNS = (AUDIT_TABLE.c.id, AUDIT_TABLE.c.txid, AUDIT_TABLE.c.row_hash, AUDIT_TABLE.c.changed_at)
_CANDIDATES: dict[str, Select[*tuple[Any, ...]]] = {
    "postgresql": Select(*_CANDIDATE_COLUMNS)
    .where(
        AUDIT_TABLE.c.txid >= bindparam("horizon", type_=BigInteger),
        AUDIT_TABLE.c.row_hash.is_not(None),
        ~_SEALED,
    )
    # By id, not transaction: an entry's id is drawn while the row it records is locked, so the
    # entries of one task come in the order its changes committed (a transaction that began
    # first may take the row's lock last).
    .order_by(AUDIT_TABLE.c.id)
    .limit(bindparam("limit", type_=Integer)),
    "sqlite": Select(*_CANDIDATE_COLUMNS)
    .where(AUDIT_TABLE.c.id > bindparam("horizon", type_=BigInteger), AUDIT_TABLE.c.row_hash.is_not(None))
    .order_by(AUDIT_TABLE.c.id)
    .limit(bindparam("limit", type_=Integer)),
}
# The seals of a round: on PostgreSQL one INSERT of arrays unnested (10,000 seals in one
# statement; as rows of VALUES they cost several times as much); on SQLite, rows.
_SEAL_COLUMNS = ("seq", "entry_id", "prev_hash", "entry_hash")
_INSERT_SEALS = {
    "postgresql": insert(SEAL_TABLE).from_select(
        [*_SEAL_COLUMNS, "sealed_at"],
        sql_select(
            *(
                func.unnest(bindparam(f"{name}s", type_=ARRAY(SEAL_TABLE.c[name].type))).label(name)
                for name in _SEAL_COLUMNS
            ),
            bindparam("sealed_at", type_=UTCDateTime()),
        ),
    ),
    "sqlite": insert(SEAL_TABLE),
}


async def seal(session: AsyncSession, sealer: str, *, batch: int, lease: timedelta) -> Round | None:
    """One sealing round, in the caller's writing transaction: take or renew the lease, then seal
    up to `batch` committed entries in order. None when another sealer's lease is live."""
    now = utcnow()
    chain = (await session.exec(_CHAIN_ROW)).one()  # locked until the round commits
    if chain.sealer not in (None, sealer) and chain.lease_until is not None and chain.lease_until > now:
        return None
    postgresql = session.get_bind().dialect.name == "postgresql"
    # On PostgreSQL, the oldest transaction still running, read before the candidates: every
    # row of an older transaction was committed (or rolled back) before they are read, so none
    # can appear below the new horizon later.
    xmin = (await session.exec(_XMIN)).one() if postgresql else None
    found = await session.exec(
        _CANDIDATES["postgresql" if postgresql else "sqlite"],
        params={"horizon": chain.horizon, "limit": batch + 1},
    )
    rows = cast(Sequence[Row[Any]], found.all())
    left = rows[batch] if len(rows) > batch else None
    rows = rows[:batch]
    seals: dict[str, list[Any]] = {name: [] for name in _SEAL_COLUMNS}
    seq, head = chain.head_seq, chain.head_hash
    for row in rows:
        seq += 1
        entry_hash = link_hash(head, seq, row.id, row.row_hash)
        for name, value in zip(_SEAL_COLUMNS, (seq, row.id, head, entry_hash), strict=True):
            seals[name].append(value)
        head = entry_hash
    if rows and postgresql:
        arrays = {f"{name}s": values for name, values in seals.items()}
        await session.exec(_INSERT_SEALS["postgresql"], params={**arrays, "sealed_at": now})
    elif rows:
        each = [
            dict(zip(seals, values, strict=True)) | {"sealed_at": now}
            for values in zip(*seals.values(), strict=True)
        ]
        await session.exec(_INSERT_SEALS["sqlite"], params=each)
    if xmin is not None:
        # PostgreSQL's horizon is a transaction id. Everything committed past it is sealed
        # unless the round stopped at the batch size; then it stays, since the rows left may
        # belong to any transaction past it.
        if left is None:
            chain.horizon = xmin
    elif rows:
        chain.horizon = rows[-1].id  # on SQLite an entry id: with one writer, ids commit in order
    chain.head_seq, chain.head_hash = seq, head
    chain.sealer, chain.lease_until = sealer, now + lease
    session.add(chain)
    oldest = min((row.changed_at for row in rows), default=None)
    return Round(sealed=len(rows), head_seq=seq, head_hash=head, oldest=oldest, more=left is not None)


# --- verifying -------------------------------------------------------------------------------


class ChainProblem(TypedDict):
    seq: NotRequired[int]
    id: NotRequired[int]
    problem: str


class ChainReport(TypedDict):
    ok: Annotated[bool, Field(description="Every sealed entry and checkpoint matches.")]
    entries_checked: int
    unsealed: Annotated[int, Field(description="Committed, not yet sealed.")]
    checkpoints_checked: int
    from_seq: NotRequired[Annotated[int, Field(description="Verified before: walked on from here.")]]
    head_seq: NotRequired[int]
    head_hash: NotRequired[
        Annotated[str, Field(description="Hash of the newest entry: keep it elsewhere to detect a rewrite.")]
    ]
    first_problem: NotRequired[ChainProblem]


@dataclass
class _Walk:
    checked: int = 0
    seq: int = 0
    hash: str = GENESIS
    # Checkpoints by position, each to be met by the walk.
    expected: dict[int, Checkpoint] = field(default_factory=dict)
    met: int = 0
    start: int = 0


@dataclass(frozen=True)
class Position:
    """A place in the chain a walk reached: the entry's position and hash."""

    seq: int
    hash: str


async def verify(
    session: AsyncSession,
    keys: CheckpointKeys,
    external: Sequence[Checkpoint] = (),
    start: Position | None = None,
) -> ChainReport:
    """Walk the chain in order, a batch at a time, and stop at the first mismatch: the whole
    chain, or on from `start`, a position an earlier walk verified (the entries up to it are not
    read again, so a change to them is found by the next whole walk). Every checkpoint, those in
    the database and `external` ones (kept elsewhere), must carry a valid signature by one of
    `keys`, and those past `start` must name a head the chain still holds."""
    walk = _Walk() if start is None else _Walk(seq=start.seq, hash=start.hash, start=start.seq)
    stored = [Checkpoint.of(row) for row in (await session.exec(_CHECKPOINTS)).all()]
    # Without a key, a checkpoint proves nothing: anyone could have written it.
    for checkpoint in [*stored, *external] if keys else []:
        if (problem := keys.check(checkpoint)) is not None:
            return _report(walk, {"seq": checkpoint.seq, "problem": problem}, 0)
        if checkpoint.seq <= walk.start:
            continue  # met by the walk that verified the start
        known = walk.expected.setdefault(checkpoint.seq, checkpoint)
        if known.head_hash != checkpoint.head_hash:
            problem = "two signed checkpoints name different heads for this position: the chain was rewritten"
            return _report(walk, {"seq": checkpoint.seq, "problem": problem}, 0)
    dialect = session.get_bind().dialect.name
    if start is not None and (problem := await _still_at(session, dialect, start)) is not None:
        return _report(walk, {"seq": start.seq, "problem": problem}, 0)
    for query, check in ((_LEGACY_WALK[dialect], _check_legacy), (_SEAL_WALK[dialect], _check_sealed)):
        while True:
            found = await session.exec(query, params={"after": walk.seq, "batch": BATCH})
            rows = cast(Sequence[Row[Any]], found.all())
            for row in rows:
                mismatch = _check_position(walk, row) or check(row)
                if mismatch is not None:
                    return _report(walk, {"seq": row.seq, "id": row.id, "problem": mismatch}, 0)
                walk.checked += 1
                walk.seq, walk.hash = row.seq, row.entry_hash
                if (expected := walk.expected.get(row.seq)) is not None:
                    if expected.head_hash != row.entry_hash:
                        problem = (
                            "entry differs from the signed checkpoint of its place: the chain was rewritten"
                        )
                        return _report(walk, {"seq": row.seq, "id": row.id, "problem": problem}, 0)
                    walk.met += 1
            if len(rows) < BATCH:
                break
    if beyond := [seq for seq in walk.expected if seq > walk.seq]:
        problem = (
            f"the chain ends at {walk.seq}, but a signed checkpoint covers it up to {max(beyond)}: "
            "its newest entries were removed"
        )
        return _report(walk, {"seq": max(beyond), "problem": problem}, 0)
    chain = (await session.exec(select(AuditChain))).one()
    outside = (await session.exec(_OUTSIDE[dialect], params={"horizon": chain.horizon})).first()
    if outside is not None:
        problem = "entry is outside the chain: written behind the stamp, or passed over by the sealer"
        return _report(walk, {"id": outside, "problem": problem}, 0)
    unsealed = (await session.exec(_PENDING[dialect], params={"horizon": chain.horizon})).one()
    return _report(walk, None, unsealed)


_CHECKPOINTS = select(AuditCheckpoint).order_by(col(AuditCheckpoint.seq))


async def _still_at(session: AsyncSession, dialect: str, start: Position) -> str | None:
    """Whether the entry a walk starts after is still there, as it was verified."""
    for query in (_LEGACY_WALK[dialect], _SEAL_WALK[dialect]):
        found = await session.exec(query, params={"after": start.seq - 1, "batch": 1})
        row = cast(Row[Any] | None, found.first())
        if row is not None and row.seq == start.seq:
            if row.entry_hash != start.hash or not getattr(row, "present", True):
                return (
                    "the entry an earlier verification ended at has changed or gone: the chain was rewritten"
                )
            return None
    return "the entry an earlier verification ended at has gone: the chain's newest entries were removed"


def _walks(dialect: str) -> tuple[Any, Any]:
    """A batch of entries after position `after`: those sealed on insert, each with the hash the
    database computes for it now; then those sealed after commit, each with the content hash the
    database computes for it now (none when its row is gone)."""
    entry, seal = AUDIT_TABLE.c, SEAL_TABLE.c
    if dialect == "postgresql":
        legacy_hash = func.audit_entry_hash(AUDIT_TABLE.table_valued())
        row_hash = func.audit_row_hash(AUDIT_TABLE.table_valued())
    else:
        legacy_hash = func.audit_entry_hash(entry.prev_hash, *(entry[name] for name in LEGACY_CONTENT))
        row_hash = func.audit_row_hash(*(entry[name] for name in ROW_CONTENT))
    after = bindparam("after", type_=BigInteger)
    limit = bindparam("batch", type_=Integer)
    legacy: Select[*tuple[Any, ...]] = (
        Select(entry.seq, entry.id, entry.prev_hash, entry.entry_hash, legacy_hash.label("computed"))
        .where(entry.seq > after)
        .order_by(entry.seq)
        .limit(limit)
    )
    sealed: Select[*tuple[Any, ...]] = (
        Select(
            seal.seq,
            seal.entry_id.label("id"),
            seal.prev_hash,
            seal.entry_hash,
            entry.id.is_not(None).label("present"),
            row_hash.label("row_hash"),
        )
        .select_from(SEAL_TABLE.outerjoin(AUDIT_TABLE, entry.id == seal.entry_id))
        .where(seal.seq > after)
        .order_by(seal.seq)
        .limit(limit)
    )
    return legacy, sealed


_WALKS = {dialect: _walks(dialect) for dialect in ("postgresql", "sqlite")}
_LEGACY_WALK = {dialect: walks[0] for dialect, walks in _WALKS.items()}
_SEAL_WALK = {dialect: walks[1] for dialect, walks in _WALKS.items()}
_UNSEALED = (col(AuditEntry.seq).is_(None), ~_SEALED)
# Entries the sealer will never seal: written with the stamp off (no transaction or hash), or
# below its horizon yet unsealed.
_PASSED = {
    "postgresql": col(AuditEntry.txid).is_(None)
    | col(AuditEntry.row_hash).is_(None)
    | (col(AuditEntry.txid) < bindparam("horizon", type_=BigInteger)),
    "sqlite": col(AuditEntry.row_hash).is_(None)
    | (col(AuditEntry.id) <= bindparam("horizon", type_=BigInteger)),
}
_OUTSIDE = {
    dialect: select(AuditEntry.id).where(*_UNSEALED, below).order_by(col(AuditEntry.id)).limit(1)
    for dialect, below in _PASSED.items()
}
_PENDING = {
    dialect: select(func.count()).select_from(AuditEntry).where(*_UNSEALED, ~below)
    for dialect, below in _PASSED.items()
}


def _check_position(walk: _Walk, row: Row[Any]) -> str | None:
    if row.seq != walk.seq + 1:
        missing = (
            f"entry {walk.seq + 1} is"
            if row.seq == walk.seq + 2
            else f"entries {walk.seq + 1} to {row.seq - 1} are"
        )
        return f"{missing} missing: the chain jumps from {walk.seq} to {row.seq}"
    if row.prev_hash != walk.hash:
        return "entry does not link to the entry before it (prev_hash differs)"
    return None


def _check_legacy(row: Row[Any]) -> str | None:
    if row.computed != row.entry_hash:
        return "entry's content does not match its hash: it was changed after it was written"
    return None


def _check_sealed(row: Row[Any]) -> str | None:
    if not row.present:
        return "entry is missing: its seal remains, its row was deleted"
    if link_hash(row.prev_hash, row.seq, row.id, row.row_hash) != row.entry_hash:
        return "entry's content does not match its hash: it was changed after it was written"
    return None


def _report(walk: _Walk, problem: ChainProblem | None, unsealed: int) -> ChainReport:
    report: ChainReport = {
        "ok": problem is None,
        "entries_checked": walk.checked,
        "unsealed": unsealed,
        "checkpoints_checked": walk.met,
    }
    if walk.start:
        report["from_seq"] = walk.start
    if walk.seq:
        report["head_seq"], report["head_hash"] = walk.seq, walk.hash
    if problem is not None:
        report["first_problem"] = problem
    return report


_NEWEST_PENDING = {
    dialect: select(func.max(AuditEntry.id)).where(*_UNSEALED, ~below) for dialect, below in _PASSED.items()
}


async def newest_unsealed(session: AsyncSession) -> int | None:
    """The id of the newest entry committed but not sealed yet, if any."""
    chain = (await session.exec(select(AuditChain))).one()
    query = _NEWEST_PENDING[session.get_bind().dialect.name]
    return (await session.exec(query, params={"horizon": chain.horizon})).one()


async def unsealed_up_to(session: AsyncSession, entry_id: int) -> int:
    """How many entries up to `entry_id` are committed but not sealed yet."""
    chain = (await session.exec(select(AuditChain))).one()
    query = _PENDING[session.get_bind().dialect.name].where(col(AuditEntry.id) <= entry_id)
    return (await session.exec(query, params={"horizon": chain.horizon})).one()
