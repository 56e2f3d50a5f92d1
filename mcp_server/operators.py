"""Operators: the people who sign in to the server's own pages (the OAuth consent page, the
console), and their passwords.

A password is kept only as a scrypt hash (`hash-password` makes one for the config file). Signing
in costs the same whether or not the operator exists, so the time taken does not tell which ids do.
Wrong sign-ins are counted per operator in the database (`SignIns`), across every request and
server process, and too many lock the operator out for a while.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

import anyio
import anyio.to_thread
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from mcp_server.config import OperatorConfig, Settings
from mcp_server.db import Database
from mcp_server.models import OperatorSignIn, utcnow

logger = logging.getLogger(__name__)

# scrypt's cost: 16 MiB and about 50 ms a check, enough to make guessing slow, cheap to sign in.
_N, _R, _P = 2**14, 8, 1
_MAX_PASSWORD = 1024
MIN_PASSWORD = 12
RECORDED_AS = "operator:"
# Wrong sign-ins an operator may make within the window before being locked out for a while,
# counted in the database across every request and server process.
MAX_SIGN_IN_FAILURES = 5
SIGN_IN_WINDOW = timedelta(minutes=15)
LOCKOUT = timedelta(minutes=15)
# Password checks at once in this process: each costs scrypt's 16 MiB and about 50 ms of a core.
SCRYPT_AT_ONCE = 2


@dataclass(frozen=True)
class SignIn:
    """An attempt to sign in: the operator when the password was right; else, when locked out,
    until when."""

    operator: OperatorConfig | None
    locked_until: datetime | None = None


class SignIns:
    """Operators' sign-ins on one database, with the lockout."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._checking = anyio.Semaphore(SCRYPT_AT_ONCE)

    async def check(self, db: Database, operator_id: str, password: str, source: str) -> SignIn:
        """Check an operator's password. A known operator's attempt is counted before the check,
        so guesses sent at once cannot outrun the count; too many wrong ones within the window
        lock the operator out, and a locked-out operator's password is not checked at all."""
        operator = next((o for o in self._settings.operators if o.id == operator_id), None)
        now = utcnow()
        if operator is not None:
            async with db.session(write=False) as session:
                seen = await session.get(OperatorSignIn, operator.id)
            if seen is not None and seen.locked_until is not None and seen.locked_until > now:
                return SignIn(None, seen.locked_until)
            locked_until = await _count_attempt(db, operator.id, now)
            if locked_until is not None:
                logger.warning(
                    "operator %s is locked out after failed sign-ins (from %s)", operator.id, source
                )
                return SignIn(None, locked_until)
        async with self._checking:
            signed_in = await anyio.to_thread.run_sync(sign_in, self._settings, operator_id, password)
        if signed_in is None:
            logger.warning("a failed sign-in as operator %r from %s", operator_id[:200], source)
            return SignIn(None)
        async with db.session(write=True) as session:
            counted = await session.get(OperatorSignIn, signed_in.id)
            if counted is not None:
                counted.failures, counted.locked_until = 0, None
        return SignIn(signed_in)


async def _count_attempt(db: Database, operator_id: str, now: datetime) -> datetime | None:
    """Count one attempt as a failure until it succeeds; when the operator is locked out (now, or
    by this attempt), until when. The operator's row is locked while it is counted, so attempts
    made at once are counted one after another."""
    async with db.session(write=True) as session:
        dialect = session.get_bind().dialect.name
        first = (pg_insert if dialect == "postgresql" else sqlite_insert)(OperatorSignIn)
        await session.exec(
            first.values(operator_id=operator_id, failures=0, window_started_at=now).on_conflict_do_nothing()
        )
        counted = await session.get(OperatorSignIn, operator_id, with_for_update=True, populate_existing=True)
        assert counted is not None
        if counted.locked_until is not None and counted.locked_until > now:
            return counted.locked_until
        if counted.window_started_at <= now - SIGN_IN_WINDOW:
            counted.failures, counted.window_started_at = 0, now
        counted.failures += 1
        if counted.failures > MAX_SIGN_IN_FAILURES:
            counted.locked_until = now + LOCKOUT
            return counted.locked_until
    return None


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = _scrypt(password, salt, _N, _R, _P)
    return f"scrypt:{_N}:{_R}:{_P}:{base64.b64encode(salt).decode()}:{base64.b64encode(digest).decode()}"


def sign_in(settings: Settings, operator_id: str, password: str) -> OperatorConfig | None:
    """The operator whose id and password these are, or None."""
    operator = next((o for o in settings.operators if o.id == operator_id), None)
    stored = operator.password_scrypt if operator is not None else _unknown()
    if len(password) > _MAX_PASSWORD:
        return None
    _, n, r, p, salt, digest = stored.split(":")
    tried = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    matches = hmac.compare_digest(tried, base64.b64decode(digest))
    return operator if matches and operator is not None else None


def recorded_id(operator: OperatorConfig) -> str:
    """How the audit log names what an operator did: never mistaken for an agent's identity."""
    return f"{RECORDED_AS}{operator.id}"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32)


@cache
def _unknown() -> str:
    """Checked against when the operator id is unknown, so that case costs a full check too."""
    return hash_password(os.urandom(16).hex())
