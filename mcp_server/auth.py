"""Bearer tokens over HTTP: which agent a token proves, and what that agent may do.

Two sources, tried in order: the static table of agents in the config (it stores SHA-256 hashes
of tokens, never the tokens), and signed JWTs from an identity provider (issuer, audience and
expiry checked; the token's scopes map to permissions in the config; its identity is
`jwt:<issuer>#<subject>`). A token neither accepts gets None, which the SDK answers with 401.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from typing import Any

import jwt
from mcp.server.auth.provider import AccessToken

from mcp_server.config import ConfigError, JwtConfig, Permissions, Settings

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "mts_"
MAX_IDENTITY = 200


def jwt_identity(issuer: str, subject: str) -> str:
    """The identity a JWT proves: its subject within its issuer, so that neither a static agent
    (config.py forbids ids of this form) nor another issuer's subject can be the same."""
    return f"jwt:{issuer}#{subject}"


class AgentToken(AccessToken):
    """A verified token: `agent_id` is the agent's identity, `permissions` what it may do.

    `client_id` is who holds the token in OAuth's terms: the agent itself for a static token or a
    JWT, the registered OAuth client for a token the built-in authorization server issued."""

    agent_id: str
    permissions: Permissions


def mint_token() -> str:
    """A new random bearer token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    # A plain hash is enough: the tokens are random and 256 bits long, so there is nothing to
    # guess that a slow password hash would protect.
    return hashlib.sha256(token.encode()).hexdigest()


class AgentTokenVerifier:
    """The SDK's `TokenVerifier`: static agent tokens first, then JWTs when configured."""

    def __init__(self, settings: Settings) -> None:
        self._agents = {agent.token_sha256: agent for agent in settings.agents if agent.token_sha256}
        self._jwt = _JwtKeys(settings) if settings.jwt is not None else None

    async def verify_token(self, token: str) -> AccessToken | None:
        agent = self._agents.get(token_sha256(token))
        if agent is not None:  # an agent's entry is its permissions (AgentConfig extends Permissions)
            return AgentToken(
                token=token, client_id=agent.id, agent_id=agent.id, scopes=[], permissions=agent
            )
        if self._jwt is not None and token.count(".") == 2:
            return self._jwt.verify(token)
        return None


class _JwtKeys:
    def __init__(self, settings: Settings) -> None:
        assert settings.jwt is not None
        self.config: JwtConfig = settings.jwt
        self._jwks: jwt.PyJWKSet | None = None
        self._key: Any = None
        try:
            if self.config.jwks_file is not None:
                self._jwks = jwt.PyJWKSet.from_json(self.config.jwks_file.read_text(encoding="utf-8"))
            elif self.config.public_key_file is not None:
                self._key = self.config.public_key_file.read_text(encoding="utf-8")
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise ConfigError(f"jwt: cannot load the verification key: {exc}") from None
        if self._jwks is None and self._key is None:
            assert settings.jwt_secret is not None
            self._key = settings.jwt_secret.get_secret_value()

    def verify(self, token: str) -> AgentToken | None:
        config = self.config
        try:
            claims = jwt.decode(
                token,
                self._signing_key(token),
                algorithms=list(config.algorithms),
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway_seconds,
                options={"require": ["exp", "iss", "aud", config.identity_claim]},
            )
        except (jwt.PyJWTError, KeyError) as exc:
            logger.info("rejected a JWT: %s", type(exc).__name__)
            return None
        subject = claims[config.identity_claim]
        identity = (
            jwt_identity(claims["iss"], subject) if isinstance(subject, str) and subject.strip() else ""
        )
        if not identity or len(identity) > MAX_IDENTITY:
            logger.info("rejected a JWT: its %s claim is not a usable identity", config.identity_claim)
            return None
        scopes = _scopes(claims)
        granted = Permissions.union([config.scopes[scope] for scope in scopes if scope in config.scopes])
        if named := _project_scopes(scopes):
            # project:<id> scopes narrow what the other scopes grant to those projects.
            granted = granted.narrowed_to(named)
        return AgentToken(
            token=token,
            client_id=identity,
            agent_id=identity,
            subject=subject,
            scopes=scopes,
            # The SDK refuses a token past expires_at on its own, without leeway: the leeway is
            # added here, so a JWT that expired within it admits as PyJWT's check says it should.
            expires_at=int(claims["exp"]) + config.leeway_seconds,
            claims={"iss": claims["iss"]},
            permissions=granted,
        )

    def _signing_key(self, token: str) -> Any:
        if self._jwks is None:
            return self._key
        kid = jwt.get_unverified_header(token).get("kid")
        return self._jwks[kid].key if kid is not None else self._jwks.keys[0].key


def _scopes(claims: dict[str, Any]) -> list[str]:
    """OAuth's space-separated `scope`, or the list form (`scp`) some providers use."""
    scope = claims.get("scope", claims.get("scp", []))
    if isinstance(scope, str):
        return scope.split()
    return [s for s in scope if isinstance(s, str)] if isinstance(scope, list) else []


_PROJECT_SCOPE = re.compile(r"project:([1-9][0-9]{0,15})")


def _project_scopes(scopes: list[str]) -> frozenset[int]:
    """The project ids of a token's `project:<id>` scopes."""
    return frozenset(int(found[1]) for scope in scopes if (found := _PROJECT_SCOPE.fullmatch(scope)))
