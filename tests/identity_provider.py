"""A minimal external identity provider for tests: an OAuth 2.1 authorization server built from the
MCP SDK's own endpoints, which approves every request at once (as if its user were signed in) and
issues RS256 JWTs for the resource the client names. It stands for Okta, Entra ID, Keycloak and
the like, so a test can show an OAuth client reaching this server through an issuer it trusts.

    python -m tests.identity_provider <port> <private key PEM file>
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import jwt
import uvicorn
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    OAuthAuthorizationServerProvider,
    RefreshToken,
    TokenError,
    construct_redirect_uri,
)
from mcp.server.auth.routes import create_auth_routes
from mcp.server.auth.settings import ClientRegistrationOptions
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from pydantic import AnyHttpUrl
from starlette.applications import Starlette

SUBJECT = "idp-user"
SCOPE = "tasks.write"


class SignedInUser(OAuthAuthorizationServerProvider[AuthorizationCode, RefreshToken, AccessToken]):
    def __init__(self, issuer: str, key: str) -> None:
        self.issuer, self.key = issuer, key
        self.clients: dict[str, OAuthClientInformationFull] = {}
        self.codes: dict[str, AuthorizationCode] = {}

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        return self.clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        assert client_info.client_id is not None
        self.clients[client_info.client_id] = client_info

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        code = secrets.token_urlsafe(32)
        assert client.client_id is not None
        self.codes[code] = AuthorizationCode(
            code=code,
            scopes=params.scopes or [SCOPE],
            expires_at=time.time() + 60,
            client_id=client.client_id,
            code_challenge=params.code_challenge,
            redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource,
        )
        return construct_redirect_uri(str(params.redirect_uri), code=code, state=params.state)

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> AuthorizationCode | None:
        return self.codes.get(authorization_code)

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: AuthorizationCode
    ) -> OAuthToken:
        del self.codes[authorization_code.code]
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": authorization_code.resource,
            "sub": SUBJECT,
            "scope": SCOPE,
            "iat": now,
            "exp": now + 300,
        }
        return OAuthToken(
            access_token=jwt.encode(claims, self.key, algorithm="RS256"), expires_in=300, scope=SCOPE
        )

    async def load_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: str
    ) -> RefreshToken | None:
        return None

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: RefreshToken, scopes: list[str]
    ) -> OAuthToken:
        raise TokenError("invalid_grant", "no refresh tokens here")

    async def load_access_token(self, token: str) -> AccessToken | None:
        return None

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        return None


def main() -> None:
    port, key_file = int(sys.argv[1]), Path(sys.argv[2])
    issuer = f"http://127.0.0.1:{port}"
    provider = SignedInUser(issuer, key_file.read_text())
    routes = create_auth_routes(
        provider, AnyHttpUrl(issuer), client_registration_options=ClientRegistrationOptions(enabled=True)
    )
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
