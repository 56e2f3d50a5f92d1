"""The sealer: a task in every server process that seals committed audit entries into the chain
and writes signed checkpoints of its head.

Every `seal_interval_ms` it asks the database whether anything waits to be sealed (one cheap
read). When something does, it runs a round (chain.seal) in one writing transaction. Only the
process holding the lease in `audit_chain` seals, so one sealer is active per database however
many servers run; when its process stops, another takes over once the lease runs out. A round
killed midway commits nothing, so the next one seals the same entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import BigInteger, Row, bindparam, exists, func, literal, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select
from sqlmodel.sql.expression import Select

from mcp_server import chain
from mcp_server.checkpoints import Checkpoint, Signer
from mcp_server.config import Settings
from mcp_server.db import Database
from mcp_server.errors import CommitUnknownError
from mcp_server.models import (
    AUDIT_TABLE,
    CHAIN_TABLE,
    CHECKPOINT_TABLE,
    SEAL_TABLE,
    AuditChain,
    AuditCheckpoint,
    utcnow,
)
from mcp_server.schemas import iso_time

logger = logging.getLogger(__name__)
# The name of the asyncio task a server runs the sealer in.
SEALER_TASK = "audit sealer"


@dataclass(frozen=True)
class _State:
    work: bool  # committed entries wait to be sealed
    head_seq: int
    checkpoint_seq: int  # 0: none yet
    checkpoint_at: float | None  # unix time of the newest checkpoint


_CHAIN, _ENTRY, _CHECKPOINT = CHAIN_TABLE.c, AUDIT_TABLE.c, CHECKPOINT_TABLE.c
# Whether entries wait past the horizon, given as a value: PostgreSQL then plans for it and reads
# the index from there (compared with the chain row's column, it read all 5,000,000 entries).
_HORIZON = bindparam("horizon", type_=BigInteger)
_WORK = {
    "postgresql": select(
        exists().where(
            _ENTRY.txid >= _HORIZON,
            _ENTRY.row_hash.is_not(None),
            ~exists().where(SEAL_TABLE.c.entry_id == _ENTRY.id),
        )
    ),
    "sqlite": select(exists().where(_ENTRY.id > _HORIZON, _ENTRY.row_hash.is_not(None))),
}
_NEWEST_CHECKPOINT = select(_CHECKPOINT.seq).order_by(_CHECKPOINT.seq.desc()).limit(1)
_CHAIN_STATE: Select[*tuple[Any, ...]] = Select(
    _CHAIN.horizon,
    _CHAIN.head_seq,
    func.coalesce(_NEWEST_CHECKPOINT.scalar_subquery(), literal(0)).label("checkpoint_seq"),
    _NEWEST_CHECKPOINT.with_only_columns(_CHECKPOINT.signed_at).scalar_subquery().label("checkpoint_at"),
).where(_CHAIN.id == 1)


_RELEASE = (
    update(AuditChain)
    .where(col(AuditChain.sealer) == bindparam("holder"))
    .values(sealer=None, lease_until=None)
)


class Sealer:
    def __init__(self, db: Database, settings: Settings, signer: Signer | None) -> None:
        """`signer`: the key of checkpoints; none, and no checkpoints are written."""
        self.db = db
        self.settings = settings
        self.signer = signer
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = timedelta(seconds=settings.seal_lease_seconds)
        self._failing_since: float | None = None
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Seal until `stop`; a database that fails is retried at the next interval."""
        interval = self.settings.seal_interval_ms / 1000
        while not self._stopping.is_set():
            try:
                more = await self.step()
            except (SQLAlchemyError, OSError, CommitUnknownError) as exc:
                # A round whose commit's answer was lost may have sealed or not: the next round
                # reads the chain as it is and goes on from there.
                self._report_failure(exc)
                more = False
            else:
                if self._failing_since is not None:
                    logger.info("the sealer reaches the database again")
                    self._failing_since = None
            if not more:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), interval)

    def stop(self) -> None:
        """End `run` after its round: a round cancelled midway would leave its connection to the
        pool's cleanup, which a cancelled task cannot finish."""
        self._stopping.set()

    async def step(self) -> bool:
        """Seal what waits, when this process holds (or can take) the lease; checkpoint when due.
        True when entries are left for another round right away."""
        state = await self._state()
        due = self._checkpoint_due(state)
        if not state.work and not due:
            return False
        checkpoint: Checkpoint | None = None
        async with self.db.session(write=True) as session:
            round_ = await chain.seal(session, self.name, batch=self.settings.seal_batch, lease=self.lease)
            if round_ is None:
                return False  # another sealer's lease is live
            if self.signer is not None and due and round_.head_seq > state.checkpoint_seq:
                at = utcnow()
                checkpoint = self.signer.sign(round_.head_seq, round_.head_hash, iso_time(at))
                session.add(
                    AuditCheckpoint(
                        seq=checkpoint.seq,
                        head_hash=checkpoint.head_hash,
                        signed_at=at,
                        key_id=checkpoint.key_id,
                        signature=checkpoint.signature,
                    )
                )
        if round_.sealed:
            logger.debug("sealed %d audit entries up to %d", round_.sealed, round_.head_seq)
        if checkpoint is not None:
            await self._publish(checkpoint)
        return round_.more

    async def _state(self) -> _State:
        async with self.db.session(write=False) as session:
            row = cast(Row[Any], (await session.exec(_CHAIN_STATE)).one())
            work = _WORK[session.get_bind().dialect.name]
            waiting = (await session.exec(work, params={"horizon": row.horizon})).one()
        at = row.checkpoint_at
        return _State(
            work=bool(waiting),
            head_seq=row.head_seq,
            checkpoint_seq=row.checkpoint_seq,
            checkpoint_at=None if at is None else at.timestamp(),
        )

    def _checkpoint_due(self, state: _State) -> bool:
        if self.signer is None or (state.head_seq <= state.checkpoint_seq and not state.work):
            return False
        return (
            state.checkpoint_at is None
            or time.time() - state.checkpoint_at >= self.settings.checkpoint_interval_seconds
        )

    async def _publish(self, checkpoint: Checkpoint) -> None:
        """Hand the checkpoint to the file and the command the settings name; a failure is logged,
        the checkpoint stays in the database, and the next one is handed over as usual."""
        line = checkpoint.to_json() + "\n"
        if (path := self.settings.checkpoint_file) is not None:
            try:
                await asyncio.to_thread(_append, path, line)
            except OSError as exc:
                logger.error("cannot append the audit checkpoint at %d to %s: %s", checkpoint.seq, path, exc)
        if command := self.settings.checkpoint_command:
            try:
                process = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.DEVNULL,  # stdout may be the protocol's stream
                )
                await asyncio.wait_for(process.communicate(line.encode()), timeout=30)
            except (OSError, TimeoutError) as exc:
                logger.error(
                    "the checkpoint command failed for the checkpoint at %d: %s", checkpoint.seq, exc
                )
            else:
                if process.returncode:
                    logger.error(
                        "the checkpoint command exited %d for the checkpoint at %d",
                        process.returncode,
                        checkpoint.seq,
                    )

    async def release(self) -> None:
        """Give up the lease, so that another server's sealer takes over at once, not when it runs out."""
        async with self.db.session(write=True) as session:
            await session.exec(_RELEASE, params={"holder": self.name})

    def _report_failure(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            logger.warning("the sealer cannot reach the database (%s); it retries", type(exc).__name__)


def _append(path: os.PathLike[str], line: str) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(line)
        file.flush()
        os.fsync(file.fileno())


async def wait_until_sealed(sealer: Sealer, seconds: float) -> bool:
    """Whether every entry committed before the call was sealed within `seconds`; this process
    seals them itself while no other sealer holds the lease, and gives the lease up after."""
    async with sealer.db.session(write=False) as session:
        newest = await chain.newest_unsealed(session)
    if newest is None:
        return True
    deadline = time.monotonic() + seconds
    try:
        while True:
            more = await sealer.step()
            async with sealer.db.session(write=False) as session:
                if not await chain.unsealed_up_to(session, newest):
                    return True
            if time.monotonic() > deadline:
                return False
            if not more:
                await asyncio.sleep(sealer.settings.seal_interval_ms / 1000)
    finally:
        await sealer.release()
