"""Console sign-ins: a random secret in an HttpOnly, SameSite=Strict cookie (Secure over HTTPS),
of which the database keeps only the SHA-256, with a form token that every change the operator
makes must carry (CSRF). A sign-in lasts `console.session_minutes` from its last use, is kept in
the database so every server process knows it, and ends at sign-out."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server.config import OperatorConfig, Settings
from mcp_server.models import ConsoleSession, utcnow

SECURE_COOKIE = "__Host-console"  # a __Host- cookie is sent only over HTTPS, to this host, path /
PLAIN_COOKIE = "console"
SIGN_IN_COOKIE_SUFFIX = "-sign-in"  # the sign-in form's own token, before there is a session
PRUNED_PER_SIGN_IN = 100


@dataclass(frozen=True)
class SignedIn:
    operator: OperatorConfig
    csrf_token: str
    expires_at: datetime
    renew: bool = False  # half its time has passed: it starts over (`renew`)


def cookie_name(settings: Settings) -> str:
    return SECURE_COOKIE if settings.secure_cookies else PLAIN_COOKIE


def new_token() -> str:
    return secrets.token_urlsafe(32)


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _lifetime(settings: Settings) -> timedelta:
    assert settings.console is not None
    return timedelta(minutes=settings.console.session_minutes)


async def start(session: AsyncSession, settings: Settings, operator: OperatorConfig) -> str:
    """A new sign-in of `operator`: the cookie's secret (the database keeps its hash)."""
    now = utcnow()
    await session.exec(delete(ConsoleSession).where(col(ConsoleSession.expires_at) <= now))
    token = new_token()
    session.add(
        ConsoleSession(
            token_sha256=_sha256(token),
            operator_id=operator.id,
            csrf_token=new_token(),
            created_at=now,
            expires_at=now + _lifetime(settings),
        )
    )
    return token


async def current(session: AsyncSession, settings: Settings, token: str | None) -> SignedIn | None:
    """The sign-in the cookie's secret names, if it is live and its operator still configured."""
    if not token or len(token) > 200:
        return None
    found = await session.get(ConsoleSession, _sha256(token))
    now = utcnow()
    if found is None or found.expires_at <= now:
        return None
    operator = next((o for o in settings.operators if o.id == found.operator_id), None)
    if operator is None:  # removed from the configuration since: no longer signed in
        return None
    renew = found.expires_at - now < _lifetime(settings) / 2
    return SignedIn(operator, found.csrf_token, found.expires_at, renew)


async def renew(session: AsyncSession, settings: Settings, token: str) -> None:
    """A sign-in in use lasts on: its time starts over (once half of it has passed)."""
    found = await session.get(ConsoleSession, _sha256(token), with_for_update=True)
    if found is not None:
        found.expires_at = utcnow() + _lifetime(settings)


async def end(session: AsyncSession, token: str | None) -> None:
    if token and len(token) <= 200:
        await session.exec(delete(ConsoleSession).where(col(ConsoleSession.token_sha256) == _sha256(token)))
