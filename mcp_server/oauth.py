"""The built-in OAuth 2.1 authorization server, for teams without an identity provider.

The SDK serves the endpoints (metadata, /authorize, /token, /register, /revoke) and checks what
the protocol demands (client authentication, redirect URIs, PKCE, expiry); this module is the
provider behind them, storing what it hands out in the database, so stateless server processes
on one database share it:

- a client registers itself (dynamic registration, RFC 7591);
- /authorize sends the person to the consent page (consent.py), where an operator signs in and
  chooses which configured agent the client acts as, with that agent's permissions or read-only;
  the choice is a grant, recorded in the audit log under the operator's identity;
- the client redeems the code once (PKCE) for an access token and a refresh token; a refresh
  token is rotated on every use; a code or refresh token used twice is a replay and revokes the
  grant with every token issued for it;
- an access token maps to the grant's agent exactly as a minted token does, so what the client
  does is recorded under that agent; an agent removed from the config takes its grants with it.

Every value handed out is 256 random bits, stored as its SHA-256 only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    AuthorizeError,
    OAuthAuthorizationServerProvider,
    RefreshToken,
    RegistrationError,
    TokenError,
    construct_redirect_uri,
)
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from sqlalchemy import delete, exists, func, update
from sqlmodel import col, select

from mcp_server import audit, operators
from mcp_server.auth import AgentToken, AgentTokenVerifier
from mcp_server.config import OAuthConfig, OperatorConfig, Permissions, Settings
from mcp_server.db import Database
from mcp_server.identity import UNRESTRICTED, Call, new_request_id
from mcp_server.models import (
    AuditAction,
    OAuthClient,
    OAuthGrant,
    OAuthSecret,
    OAuthSecretKind,
    utcnow,
)
from mcp_server.operators import recorded_id

logger = logging.getLogger(__name__)

CONSENT_PATH = "/oauth/consent"
ACCESS_PREFIX = "mto_"
REFRESH_PREFIX = "mtr_"
CODE_PREFIX = "mtc_"
# Registrations nobody authorized are forgotten after a day; at most this many wait at once, each
# with at most this much metadata, so anonymous registration cannot fill the database.
UNUSED_CLIENT_DAYS = 1
MAX_UNUSED_CLIENTS = 1_000
MAX_REGISTRATION_BYTES = 16_384
MAX_REDIRECT_URIS = 10
MAX_URI_LENGTH = 2_000
# Authorization requests one client may have waiting on the consent page, and their sizes.
MAX_PENDING_PER_CLIENT = 10
MAX_STATE_LENGTH = 1_000
MAX_SCOPES = 20
# An access token read from the database is trusted this long by the process that read it, so a
# client's requests do not each cost a database read (2 to 3 ms of server CPU a call, measured by
# bench/auth.py); a revocation takes effect at once in the process that revoked, and within this
# time in the others.
VERIFIED_SECONDS = 10.0
MAX_VERIFIED = 10_000
LOOPBACK_REDIRECT_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
# How often a process clears expired values and stale registrations.
SWEEP_SECONDS = 60.0


class IssuedCode(AuthorizationCode):
    grant_id: int


class IssuedRefreshToken(RefreshToken):
    grant_id: int


@dataclass(frozen=True)
class Pending:
    """An authorization request waiting on the consent page."""

    client_id: str
    client_name: str | None
    redirect_uri: str
    state: str | None
    scopes: list[str]


def secret_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _new(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


class BuiltInAuthorization(OAuthAuthorizationServerProvider[IssuedCode, IssuedRefreshToken, AccessToken]):
    """The SDK's `OAuthAuthorizationServerProvider`, on the server's database. (The identity
    assertion grant it inherits stays refused: no identity provider is involved here.)"""

    def __init__(self, settings: Settings, verifier: AgentTokenVerifier) -> None:
        assert settings.oauth is not None
        self._settings = settings
        self._config: OAuthConfig = settings.oauth
        self._verifier = verifier
        self._db: Database | None = None
        self._swept = 0.0
        self._sign_ins = operators.SignIns(settings)
        # Access tokens read from the database lately: sha256 -> (the token, until when to trust it).
        self._verified: dict[str, tuple[AgentToken, float]] = {}

    @property
    def issuer(self) -> str:
        return self._settings.issuer_url

    def open(self, db: Database) -> None:
        self._db = db

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("the authorization server is used before the server started")
        return self._db

    # Registration (RFC 7591): the SDK has checked the metadata and made the id and secret.

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        async with self.db.session(write=False) as session:
            found = await session.get(OAuthClient, client_id)
        return None if found is None else OAuthClientInformationFull.model_validate(found.info)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        info = client_info.model_dump(mode="json", exclude_none=True)
        problem = _registration_problem(client_info, info)
        if problem is not None:
            raise RegistrationError(*problem)
        await self._sweep()
        full = False
        async with self.db.session(write=True) as session:
            waiting = (
                await session.exec(
                    select(func.count())
                    .select_from(OAuthClient)
                    .where(~exists().where(col(OAuthGrant.client_id) == OAuthClient.client_id))
                )
            ).one()
            full = waiting >= MAX_UNUSED_CLIENTS
            if not full:
                assert client_info.client_id is not None
                session.add(OAuthClient(client_id=client_info.client_id, info=info, registered_at=utcnow()))
        if full:
            logger.warning("OAuth registration refused: %s registered clients wait to be authorized", waiting)
            raise RegistrationError(
                "invalid_client_metadata",
                "too many registered clients are waiting to be authorized; try again later",
            )

    # Authorization: the request waits on the consent page for an operator's decision.

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        if params.resource is not None and params.resource.rstrip("/") != self._settings.resource_url:
            raise AuthorizeError(
                "invalid_target", f"this server issues tokens only for {self._settings.resource_url}"
            )
        if len(params.state or "") > MAX_STATE_LENGTH or len(params.scopes or []) > MAX_SCOPES:
            raise AuthorizeError(
                "invalid_request", f"state is limited to {MAX_STATE_LENGTH} characters, scope to {MAX_SCOPES}"
            )
        await self._sweep()
        request = _new()
        assert client.client_id is not None
        now = utcnow()
        async with self.db.session(write=True) as session:
            waiting = (
                await session.exec(
                    select(func.count())
                    .select_from(OAuthSecret)
                    .where(
                        OAuthSecret.client_id == client.client_id,
                        OAuthSecret.kind == OAuthSecretKind.REQUEST,
                        col(OAuthSecret.used_at).is_(None),
                        col(OAuthSecret.expires_at) > now,
                    )
                )
            ).one()
            if waiting < MAX_PENDING_PER_CLIENT:
                session.add(
                    OAuthSecret(
                        value_sha256=secret_hash(request),
                        kind=OAuthSecretKind.REQUEST,
                        client_id=client.client_id,
                        details=params.model_dump(mode="json"),
                        expires_at=now + timedelta(seconds=self._config.consent_seconds),
                    )
                )
        if waiting >= MAX_PENDING_PER_CLIENT:
            raise AuthorizeError(
                "temporarily_unavailable",
                f"{waiting} authorization requests of this client wait on the consent page already",
            )
        return construct_redirect_uri(self.issuer + CONSENT_PATH, request=request)

    async def pending(self, request: str) -> Pending | None:
        """The request waiting on the consent page under this value, if it still waits."""
        async with self.db.session(write=False) as session:
            found = (
                await session.exec(
                    select(OAuthSecret, OAuthClient)
                    .join(OAuthClient, col(OAuthClient.client_id) == OAuthSecret.client_id)
                    .where(
                        OAuthSecret.value_sha256 == secret_hash(request),
                        OAuthSecret.kind == OAuthSecretKind.REQUEST,
                        col(OAuthSecret.used_at).is_(None),
                        col(OAuthSecret.expires_at) > utcnow(),
                    )
                )
            ).first()
        if found is None:
            return None
        secret, client = found
        params = AuthorizationParams.model_validate(secret.details)
        return Pending(
            client_id=client.client_id,
            client_name=client.info.get("client_name"),
            redirect_uri=str(params.redirect_uri),
            state=params.state,
            scopes=params.scopes or [],
        )

    async def sign_in(self, operator_id: str, password: str, source: str) -> operators.SignIn:
        """Check an operator's password (operators.SignIns), on the consent page."""
        return await self._sign_ins.check(self.db, operator_id, password, source)

    async def decide(
        self, request: str, operator: OperatorConfig | None, agent_id: str | None, read_only: bool
    ) -> str | None:
        """The operator's decision on a waiting request: with an agent, a grant and a code; without
        (or without an operator), a refusal. The URL to send the person back to the client with,
        or None when the request no longer waits."""
        now = utcnow()
        async with self.db.session(write=True) as session:
            taken = (
                await session.exec(
                    update(OAuthSecret)
                    .where(
                        col(OAuthSecret.value_sha256) == secret_hash(request),
                        col(OAuthSecret.kind) == OAuthSecretKind.REQUEST,
                        col(OAuthSecret.used_at).is_(None),
                        col(OAuthSecret.expires_at) > now,
                    )
                    .values(used_at=now)
                    .returning(col(OAuthSecret.client_id), col(OAuthSecret.details))
                )
            ).first()
            if taken is None:
                return None
            params = AuthorizationParams.model_validate(taken.details)
            if operator is None or agent_id is None:
                return construct_redirect_uri(
                    str(params.redirect_uri), error="access_denied", state=params.state, iss=self.issuer
                )
            grant = OAuthGrant(
                client_id=taken.client_id,
                agent_id=agent_id,
                read_only=read_only,
                scopes=params.scopes or [],
                resource=params.resource,
                granted_by=recorded_id(operator),
                granted_at=now,
            )
            session.add(grant)
            await session.flush()
            assert grant.id is not None
            code = _new(CODE_PREFIX)
            session.add(
                OAuthSecret(
                    value_sha256=secret_hash(code),
                    kind=OAuthSecretKind.CODE,
                    client_id=taken.client_id,
                    grant_id=grant.id,
                    details={
                        "code_challenge": params.code_challenge,
                        "redirect_uri": str(params.redirect_uri),
                        "redirect_uri_provided_explicitly": params.redirect_uri_provided_explicitly,
                    },
                    expires_at=now + timedelta(seconds=self._config.code_seconds),
                )
            )
            client = await session.get(OAuthClient, taken.client_id)
            call = Call(
                tool="oauth/authorize",
                agent_id=recorded_id(operator),
                permissions=UNRESTRICTED,
                request_id=new_request_id(),
            )
            granted = {
                "grant": grant.id,
                "oauth_client": taken.client_id,
                "client_name": None if client is None else client.info.get("client_name"),
                "redirect_uri": str(params.redirect_uri),
                "agent": agent_id,
                "read_only": read_only,
            }
            session.add(audit.entry(call, AuditAction.AUTHORIZED, now, None, None, granted))
        logger.info(
            "%s authorized OAuth client %s as agent %s", recorded_id(operator), taken.client_id, agent_id
        )
        return construct_redirect_uri(
            str(params.redirect_uri), code=code, state=params.state, iss=self.issuer
        )

    # Tokens: the SDK has authenticated the client and will check PKCE, redirect URI and expiry.

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> IssuedCode | None:
        found = await self._issued(authorization_code, OAuthSecretKind.CODE, client)
        if found is None:
            return None
        secret, grant = found
        return IssuedCode(
            code=authorization_code,
            scopes=grant.scopes,
            expires_at=secret.expires_at.timestamp(),
            client_id=secret.client_id,
            code_challenge=secret.details["code_challenge"],
            redirect_uri=secret.details["redirect_uri"],
            redirect_uri_provided_explicitly=secret.details["redirect_uri_provided_explicitly"],
            resource=grant.resource,
            subject=grant.agent_id,
            grant_id=grant.id,
        )

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: IssuedCode
    ) -> OAuthToken:
        return await self._redeem(authorization_code.code, authorization_code.grant_id, "authorization code")

    async def load_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: str
    ) -> IssuedRefreshToken | None:
        found = await self._issued(refresh_token, OAuthSecretKind.REFRESH, client)
        if found is None:
            return None
        secret, grant = found
        return IssuedRefreshToken(
            token=refresh_token,
            client_id=secret.client_id,
            scopes=grant.scopes,
            expires_at=int(secret.expires_at.timestamp()),
            resource=grant.resource,
            subject=grant.agent_id,
            grant_id=grant.id,
        )

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: IssuedRefreshToken, scopes: list[str]
    ) -> OAuthToken:
        return await self._redeem(refresh_token.token, refresh_token.grant_id, "refresh token", scopes)

    async def load_access_token(self, token: str) -> AccessToken | None:
        """Any bearer token the server accepts: a static agent token first, then one issued here,
        which this process remembers for VERIFIED_SECONDS after reading it from the database."""
        if not token.startswith(ACCESS_PREFIX):
            return await self._verifier.verify_token(token)
        key = secret_hash(token)
        remembered = self._verified.get(key)
        if remembered is not None and remembered[1] > time.monotonic():
            known = remembered[0]
            return known if known.expires_at is None or known.expires_at > time.time() else None
        verified = await self._look_up(token, key)
        if verified is not None:
            if len(self._verified) >= MAX_VERIFIED:
                self._verified.pop(next(iter(self._verified)))  # the oldest
            self._verified[key] = (verified, time.monotonic() + VERIFIED_SECONDS)
        return verified

    async def _look_up(self, token: str, key: str) -> AgentToken | None:
        async with self.db.session(write=False) as session:
            found = (
                await session.exec(
                    select(OAuthSecret, OAuthGrant)
                    .join(OAuthGrant, col(OAuthGrant.id) == OAuthSecret.grant_id)
                    .where(
                        OAuthSecret.value_sha256 == key,
                        OAuthSecret.kind == OAuthSecretKind.ACCESS,
                        col(OAuthSecret.expires_at) > utcnow(),
                        col(OAuthGrant.revoked_at).is_(None),
                    )
                )
            ).first()
        if found is None:
            return None
        secret, grant = found
        permissions = self._permissions(grant)
        if permissions is None:
            return None
        return AgentToken(
            token=token,
            client_id=grant.client_id,
            agent_id=grant.agent_id,
            subject=grant.agent_id,
            scopes=grant.scopes,
            expires_at=int(secret.expires_at.timestamp()),
            resource=grant.resource,
            claims={"iss": self.issuer},
            permissions=permissions,
        )

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        """Revoking either token of a grant revokes the grant, and with it every token (RFC 7009 §2.1)."""
        async with self.db.session(write=True) as session:
            grant_id = (
                await session.exec(
                    select(OAuthSecret.grant_id).where(OAuthSecret.value_sha256 == secret_hash(token.token))
                )
            ).first()
            if grant_id is not None:
                await self._revoke(session, grant_id)

    # The rest.

    def _permissions(self, grant: OAuthGrant) -> Permissions | None:
        """The grant's agent's permissions as configured now (read-only if the grant says so);
        None once the agent is no longer configured."""
        agent = self._settings.agent(grant.agent_id)
        if agent is None:
            return None
        configured = Permissions.model_validate(agent.model_dump(include=set(Permissions.model_fields)))
        return configured.model_copy(update={"read_only": True}) if grant.read_only else configured

    async def _issued(
        self, value: str, kind: OAuthSecretKind, client: OAuthClientInformationFull
    ) -> tuple[OAuthSecret, OAuthGrant] | None:
        """A code or refresh token of this client, used or not (a second use is a replay), with
        its grant while the grant stands and its agent is configured."""
        async with self.db.session(write=False) as session:
            found = (
                await session.exec(
                    select(OAuthSecret, OAuthGrant)
                    .join(OAuthGrant, col(OAuthGrant.id) == OAuthSecret.grant_id)
                    .where(
                        OAuthSecret.value_sha256 == secret_hash(value),
                        OAuthSecret.kind == kind,
                        OAuthSecret.client_id == client.client_id,
                        col(OAuthGrant.revoked_at).is_(None),
                    )
                )
            ).first()
        if found is None or self._permissions(found[1]) is None:
            return None
        return found[0], found[1]

    async def _redeem(
        self, value: str, grant_id: int, what: str, scopes: list[str] | None = None
    ) -> OAuthToken:
        """Mark a code or refresh token used and issue a new access and refresh token for its grant.
        Used before: a replay (a stolen value, or a client gone wrong), so the grant is revoked."""
        now = utcnow()
        access, refresh = _new(ACCESS_PREFIX), _new(REFRESH_PREFIX)
        granted: list[str] = []
        async with self.db.session(write=True) as session:
            redeemed = (
                await session.exec(
                    update(OAuthSecret)
                    .where(
                        col(OAuthSecret.value_sha256) == secret_hash(value),
                        col(OAuthSecret.used_at).is_(None),
                    )
                    .values(used_at=now)
                    .returning(col(OAuthSecret.client_id))
                )
            ).first()
            if redeemed is not None:
                grant = await session.get(OAuthGrant, grant_id)
                assert grant is not None
                granted = grant.scopes
                lifetimes = (
                    (access, OAuthSecretKind.ACCESS, timedelta(seconds=self._config.access_token_seconds)),
                    (refresh, OAuthSecretKind.REFRESH, timedelta(days=self._config.refresh_token_days)),
                )
                for issued, kind, lifetime in lifetimes:
                    session.add(
                        OAuthSecret(
                            value_sha256=secret_hash(issued),
                            kind=kind,
                            client_id=grant.client_id,
                            grant_id=grant_id,
                            details={},
                            expires_at=now + lifetime,
                        )
                    )
            else:
                await self._revoke(session, grant_id)
        if redeemed is None:
            logger.warning("an OAuth %s was used twice; grant %s is revoked", what, grant_id)
            raise TokenError(
                "invalid_grant", f"this {what} was already used; the client must be authorized again"
            )
        return OAuthToken(
            access_token=access,
            expires_in=self._config.access_token_seconds,
            refresh_token=refresh,
            scope=" ".join(scopes if scopes is not None else granted) or None,
        )

    async def _revoke(self, session: Any, grant_id: int) -> None:
        self._verified.clear()  # in this process at once; in others within VERIFIED_SECONDS
        await session.exec(
            update(OAuthGrant)
            .where(col(OAuthGrant.id) == grant_id, col(OAuthGrant.revoked_at).is_(None))
            .values(revoked_at=utcnow())
        )

    async def _sweep(self) -> None:
        """Now and then: forget expired values and registrations nobody authorized."""
        if time.monotonic() - self._swept < SWEEP_SECONDS:
            return
        self._swept = time.monotonic()
        now = utcnow()
        async with self.db.session(write=True) as session:
            await session.exec(delete(OAuthSecret).where(col(OAuthSecret.expires_at) < now))
            await session.exec(
                delete(OAuthClient).where(
                    col(OAuthClient.registered_at) < now - timedelta(days=UNUSED_CLIENT_DAYS),
                    ~exists().where(col(OAuthGrant.client_id) == OAuthClient.client_id),
                    ~exists().where(col(OAuthSecret.client_id) == OAuthClient.client_id),
                )
            )


def _registration_problem(client: OAuthClientInformationFull, info: dict[str, Any]) -> tuple[Any, str] | None:
    """What is wrong with a registration (error code, description), if anything: a redirect URI
    a code may not be sent to (OAuth 2.1: HTTPS, or HTTP on loopback, or an app's own scheme; no
    fragment, no user name), too many of them, or too much metadata."""
    uris = [str(uri) for uri in client.redirect_uris or []]
    if not 1 <= len(uris) <= MAX_REDIRECT_URIS:
        return "invalid_redirect_uri", f"register 1 to {MAX_REDIRECT_URIS} redirect URIs"
    for uri in uris:
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        loopback = scheme == "http" and (parts.hostname or "") in LOOPBACK_REDIRECT_HOSTS
        # A native app's private-use scheme is a reversed domain name (RFC 8252 §7.1).
        private = "." in scheme and scheme not in ("http", "https")
        if len(uri) > MAX_URI_LENGTH or not (scheme == "https" or loopback or private):
            return "invalid_redirect_uri", (
                f"redirect URI {uri[:100]!r} is not allowed: use https://, http:// on a loopback "
                "address, or an app's reverse-domain scheme"
            )
        if parts.fragment or "#" in uri or parts.username is not None:
            return "invalid_redirect_uri", f"redirect URI {uri[:100]!r} may have no fragment and no user name"
    if len(json.dumps(info)) > MAX_REGISTRATION_BYTES:
        return "invalid_client_metadata", f"the registration is larger than {MAX_REGISTRATION_BYTES} bytes"
    return None
