"""The built-in OAuth 2.1 authorization server: a real server process, driven over HTTP as an OAuth
client and a person's browser would, on both databases."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import text

from mcp_server.auth import mint_token, token_sha256
from mcp_server.config import OperatorConfig, Settings
from mcp_server.db import Database
from mcp_server.oauth import VERIFIED_SECONDS
from mcp_server.operators import hash_password, sign_in
from tests.conftest import call, call_error, free_port, http_client, http_server, wait_for_port
from tests.test_http import INITIALIZE, audit_rows, entity_rows, post
from tests.test_permissions import READING_TOOLS

pytestmark = pytest.mark.anyio

PASSWORD = "a long operator password"
REDIRECT = "http://127.0.0.1:9/callback"
STATIC = mint_token()


def oauth_config(database_url: str, **oauth: Any) -> dict[str, Any]:
    hashed = hash_password(PASSWORD)
    return {
        "database_url": database_url,
        "agents": [
            {"id": "planner"},
            {"id": "limited", "tools": ["search_tasks", "create_project"]},
            {"id": "static-bot", "token_sha256": token_sha256(STATIC)},
        ],
        "operators": [
            {"id": "alice", "password_scrypt": hashed},
            {"id": "auditor", "password_scrypt": hashed, "read_only": True},
        ],
        "oauth": oauth,
    }


@dataclass
class Flow:
    """One OAuth client's way through the server, as the TypeScript or Python SDK's client goes."""

    base: str
    http: httpx2.AsyncClient
    client_id: str = ""
    verifier: str = ""

    async def register(self, name: str = "test client") -> dict[str, Any]:
        response = await self.http.post(
            self.base + "/register",
            json={
                "redirect_uris": [REDIRECT],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
                "client_name": name,
            },
        )
        assert response.status_code == 201, response.text
        registered: dict[str, Any] = response.json()
        self.client_id = registered["client_id"]
        return registered

    async def authorize(self, **extra: str) -> httpx2.Response:
        """/authorize as the client sends the browser there, with a new PKCE verifier."""
        self.verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(self.verifier.encode()).digest()).rstrip(b"=")
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": REDIRECT,
            "code_challenge": challenge.decode(),
            "code_challenge_method": "S256",
            "state": "the client's state",
            "resource": self.base + "/mcp",
        } | extra
        return await self.http.get(self.base + "/authorize", params=params)

    async def refused(self, **extra: str) -> str:
        """The error /authorize sends the browser back to the client with."""
        response = await self.authorize(**extra)
        assert response.status_code == 302, response.text
        return parse_qs(urlsplit(response.headers["location"]).query)["error"][0]

    async def consent_page(self, **extra: str) -> str:
        """The URL of the consent page /authorize sends the browser to."""
        response = await self.authorize(**extra)
        assert response.status_code == 302, response.text
        location = response.headers["location"]
        assert location.startswith(self.base + "/oauth/consent?request=")
        return location

    async def decide(self, page: str, **form: str) -> httpx2.Response:
        request = parse_qs(urlsplit(page).query)["request"][0]
        fields = {"request": request, "operator": "alice", "password": PASSWORD, "agent": "planner"}
        fields |= {"decision": "allow"} | form
        return await self.http.post(self.base + "/oauth/consent", data=fields)

    async def code(self, **form: str) -> str:
        response = await self.decide(await self.consent_page(), **form)
        assert response.status_code == 303, response.text
        back = urlsplit(response.headers["location"])
        assert f"{back.scheme}://{back.netloc}{back.path}" == REDIRECT
        query = parse_qs(back.query)
        assert query["state"] == ["the client's state"] and query["iss"] == [self.base]
        return query["code"][0]

    async def token(self, **form: str) -> httpx2.Response:
        return await self.http.post(self.base + "/token", data={"client_id": self.client_id} | form)

    async def redeem(self, code: str) -> httpx2.Response:
        return await self.token(
            grant_type="authorization_code",
            code=code,
            redirect_uri=REDIRECT,
            code_verifier=self.verifier,
            resource=self.base + "/mcp",
        )

    async def tokens(self, **form: str) -> dict[str, Any]:
        response = await self.redeem(await self.code(**form))
        assert response.status_code == 200, response.text
        issued: dict[str, Any] = response.json()
        return issued


async def flow(url: str, http: httpx2.AsyncClient) -> Flow:
    started = Flow(url.removesuffix("/mcp"), http)
    await started.register()
    return started


async def oauth_rows(db: Database, table: str) -> int:
    async with db.engine.connect() as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())  # noqa: S608


async def test_an_operator_authorizes_a_client_which_then_acts_as_the_chosen_agent(
    database_url: str, tmp_path: Path, db: Database
) -> None:
    with http_server(tmp_path, oauth_config(database_url)) as url:
        base = url.removesuffix("/mcp")
        async with httpx2.AsyncClient() as http:
            # What an OAuth client discovers from the 401 alone.
            refused = await post(url, None, json=INITIALIZE)
            assert refused.status_code == 401
            resource_metadata = base + "/.well-known/oauth-protected-resource/mcp"
            assert f'resource_metadata="{resource_metadata}"' in refused.headers["www-authenticate"]
            protected = (await http.get(resource_metadata)).json()
            assert protected["resource"] == url and protected["authorization_servers"] == [base]
            server = (await http.get(base + "/.well-known/oauth-authorization-server")).json()
            assert server["issuer"] == base
            assert server["registration_endpoint"] == base + "/register"
            assert server["code_challenge_methods_supported"] == ["S256"]
            assert {"authorization_code", "refresh_token"} <= set(server["grant_types_supported"])

            client = await flow(url, http)
            page = await client.consent_page()
            shown = await http.get(page)
            assert shown.status_code == 200
            assert shown.headers["x-frame-options"] == "DENY" and shown.headers["cache-control"] == "no-store"
            html = unescape(shown.text)
            assert "test client" in html and REDIRECT in html
            assert re.findall(r'<option value="([^"]+)"', html) == ["planner", "limited", "static-bot"]
            response = await client.decide(page)
            assert response.status_code == 303
            code = parse_qs(urlsplit(response.headers["location"]).query)["code"][0]
            issued = await client.redeem(code)
            assert issued.status_code == 200, issued.text
            tokens = issued.json()
            assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 3600
            assert tokens["access_token"].startswith("mto_") and tokens["refresh_token"].startswith("mtr_")

        async with http_client(url, tokens["access_token"], client_name="oauth-ui") as session:
            project = await call(session, "create_project", {"name": "through OAuth"})
        async with http_client(url, STATIC, client_name="static") as session:  # static tokens still work
            await call(session, "create_task", {"title": "static", "project_id": project["id"]})
    assert await audit_rows(db) == [
        ("operator:alice", None, "authorized"),
        ("planner", "oauth-ui", "created"),
        ("static-bot", "static", "created"),
    ]
    async with db.engine.connect() as conn:
        granted = (
            await conn.execute(text("SELECT new_value FROM audit_entry WHERE action = 'authorized'"))
        ).scalar_one()
    granted = granted if isinstance(granted, dict) else json.loads(granted)
    assert granted["agent"] == "planner" and granted["read_only"] is False
    assert granted["client_name"] == "test client" and granted["redirect_uri"] == REDIRECT


async def test_a_grant_carries_the_agents_permissions_or_fewer(
    database_url: str, tmp_path: Path, db: Database
) -> None:
    with http_server(tmp_path, oauth_config(database_url)) as url:
        async with httpx2.AsyncClient() as http:
            client = await flow(url, http)
            read_only = await client.tokens(read_only="yes")
            limited = await client.tokens(agent="limited")
        async with http_client(url, read_only["access_token"]) as session:
            assert {tool.name for tool in (await session.list_tools()).tools} == READING_TOOLS
            message = await call_error(session, "create_project", {"name": "no"})
            assert "permission write" in message
        async with http_client(url, limited["access_token"]) as session:
            assert {tool.name for tool in (await session.list_tools()).tools} == {
                "search_tasks",
                "create_project",
            }
            await call(session, "create_project", {"name": "yes"})
    actions = [(who, action) for who, _, action in await audit_rows(db)]
    assert actions == [
        ("operator:alice", "authorized"),
        ("operator:alice", "authorized"),
        ("planner", "refused"),
        ("limited", "created"),
    ]


async def test_a_code_or_refresh_token_used_twice_revokes_the_grant_and_its_tokens(
    database_url: str, tmp_path: Path
) -> None:
    with http_server(tmp_path, oauth_config(database_url)) as url:
        async with httpx2.AsyncClient() as http:
            client = await flow(url, http)
            code = await client.code()
            first = await client.redeem(code)
            assert first.status_code == 200
            replayed = await client.redeem(code)
            assert replayed.status_code == 400 and replayed.json()["error"] == "invalid_grant"
            assert "already used" in replayed.json()["error_description"]
            assert (await post(url, first.json()["access_token"], json=INITIALIZE)).status_code == 401

            tokens = await client.tokens()
            refreshed = await client.token(grant_type="refresh_token", refresh_token=tokens["refresh_token"])
            assert refreshed.status_code == 200, refreshed.text
            rotated = refreshed.json()
            assert rotated["refresh_token"] != tokens["refresh_token"]
            assert (await post(url, rotated["access_token"], json=INITIALIZE)).status_code == 200
            again = await client.token(grant_type="refresh_token", refresh_token=tokens["refresh_token"])
            assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
            for token in (tokens["access_token"], rotated["access_token"]):
                assert (await post(url, token, json=INITIALIZE)).status_code == 401
            last = await client.token(grant_type="refresh_token", refresh_token=rotated["refresh_token"])
            assert last.status_code == 400


async def test_revoking_either_token_ends_the_grant(database_url: str, tmp_path: Path) -> None:
    with http_server(tmp_path, oauth_config(database_url)) as url:
        async with httpx2.AsyncClient() as http:
            client = await flow(url, http)
            for kind in ("access_token", "refresh_token"):
                tokens = await client.tokens()
                # The SDK's revocation endpoint (mcp 2.3.0) requires the client_secret field even of
                # a public client, which RFC 7009 would let leave it out; an empty one passes.
                form = {"client_id": client.client_id, "client_secret": "", "token": tokens[kind]}
                revoked = await http.post(client.base + "/revoke", data=form)
                assert revoked.status_code == 200
                assert (await post(url, tokens["access_token"], json=INITIALIZE)).status_code == 401
                refused = await client.token(
                    grant_type="refresh_token", refresh_token=tokens["refresh_token"]
                )
                assert refused.status_code == 400


async def test_the_token_endpoint_checks_the_pkce_verifier_redirect_uri_and_client(
    database_url: str, tmp_path: Path
) -> None:
    with http_server(tmp_path, oauth_config(database_url)) as url:
        async with httpx2.AsyncClient() as http:
            client, other = await flow(url, http), await flow(url, http)
            code = await client.code()
            wrong = [
                client.token(
                    grant_type="authorization_code", code=code, redirect_uri=REDIRECT, code_verifier="x" * 43
                ),
                client.token(
                    grant_type="authorization_code",
                    code=code,
                    redirect_uri="http://127.0.0.1:9/elsewhere",
                    code_verifier=client.verifier,
                ),
                other.token(
                    grant_type="authorization_code",
                    code=code,
                    redirect_uri=REDIRECT,
                    code_verifier=client.verifier,
                ),
            ]
            for attempt in wrong:
                assert (await attempt).status_code == 400
            assert (await client.redeem(code)).status_code == 200  # none of those used the code up
            # A token for another resource is not this server's to issue.
            assert await client.refused(resource="https://other.example.com/mcp") == "invalid_target"


async def test_the_consent_page_grants_nothing_to_wrong_passwords_read_only_operators_or_other_sites(
    database_url: str, tmp_path: Path, db: Database
) -> None:
    with http_server(tmp_path, oauth_config(database_url)) as url:
        async with httpx2.AsyncClient() as http:
            client = await flow(url, http)
            page = await client.consent_page()
            wrong = await client.decide(page, password="not the password")
            assert wrong.status_code == 401 and "The operator id or password is wrong." in wrong.text
            unknown = await client.decide(page, operator="mallory")
            assert unknown.status_code == 401
            read_only = await client.decide(page, operator="auditor")
            assert read_only.status_code == 403 and "read-only" in read_only.text
            not_an_agent = await client.decide(page, agent="root")
            assert not_an_agent.status_code == 400 and "Choose one of the listed agents." in not_an_agent.text
            request = parse_qs(urlsplit(page).query)["request"][0]
            forged = await http.post(
                client.base + "/oauth/consent",
                data={"request": request, "operator": "alice", "password": PASSWORD, "agent": "planner"},
                headers={"Origin": "https://evil.example.com"},
            )
            assert forged.status_code == 403
            for _ in range(5):  # five wrong passwords within the window lock the operator out
                assert (await client.decide(page, password="still wrong")).status_code == 401
            locked = await client.decide(page)  # the right password no longer helps
            assert locked.status_code == 429 and "Too many failed sign-ins" in locked.text
            assert 800 < int(locked.headers["retry-after"]) <= 900
            assert (await client.decide(page)).status_code == 429

            denied = await client.decide(await client.consent_page(), decision="deny", password="")
            assert denied.status_code == 303
            answer = parse_qs(urlsplit(denied.headers["location"]).query)
            assert answer["error"] == ["access_denied"] and answer["state"] == ["the client's state"]
            unknown_request = await http.get(client.base + "/oauth/consent?request=nothing-like-it")
            assert unknown_request.status_code == 400
    assert await oauth_rows(db, "oauth_grant") == 0
    assert await audit_rows(db) == []
    assert await entity_rows(db) == []


async def test_an_agent_removed_from_the_config_takes_its_oauth_tokens_with_it(
    database_url: str, tmp_path: Path
) -> None:
    config = oauth_config(database_url)
    with http_server(tmp_path, config) as url:
        async with httpx2.AsyncClient() as http:
            tokens = await (await flow(url, http)).tokens()
            assert (await post(url, tokens["access_token"], json=INITIALIZE)).status_code == 200
    config["agents"] = [agent for agent in config["agents"] if agent["id"] != "planner"]
    with http_server(tmp_path, config) as url:
        assert (await post(url, tokens["access_token"], json=INITIALIZE)).status_code == 401


TS_CLIENT = Path(__file__).resolve().parent.parent / ".ci" / "ts-client"


def typescript_client() -> Path:
    """The pinned TypeScript SDK (.ci/run installs it before the tests); required under CI."""
    if shutil.which("node") is None or not (TS_CLIENT / "node_modules" / "@modelcontextprotocol").is_dir():
        problem = "the TypeScript SDK client needs node and `npm install --prefix .ci/ts-client`"
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return TS_CLIENT / "oauth.mjs"


async def run_typescript_client(*args: str) -> dict[str, Any]:
    script = typescript_client()
    done = await anyio.run_process(["node", str(script), *args], cwd=TS_CLIENT, check=False)
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    created: dict[str, Any] = json.loads(done.stdout)
    return created


async def test_the_typescript_sdks_oauth_client_completes_authorization_against_the_built_in_server(
    database_url: str, tmp_path: Path, db: Database
) -> None:
    typescript_client()
    with http_server(tmp_path, oauth_config(database_url)) as url:
        project = await run_typescript_client(url, "from an OAuth client", "alice", PASSWORD, "limited")
    assert project["name"] == "from an OAuth client"
    assert await audit_rows(db) == [
        ("operator:alice", None, "authorized"),
        ("limited", "ts-sdk-oauth-check", "created"),
    ]


@contextmanager
def identity_provider(port: int, private_key: Path) -> Iterator[None]:
    """tests/identity_provider.py in a subprocess, listening on `port`."""
    command = [sys.executable, "-m", "tests.identity_provider", str(port), str(private_key)]
    process = subprocess.Popen(command, cwd=TS_CLIENT.parent.parent)
    try:
        wait_for_port(port, process)
        yield
    finally:
        process.terminate()
        process.wait(timeout=20)


async def test_the_typescript_sdks_oauth_client_completes_authorization_against_an_identity_provider(
    database_url: str, tmp_path: Path, db: Database
) -> None:
    typescript_client()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = tmp_path / "idp-private.pem"
    private_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public_pem = tmp_path / "idp-public.pem"
    public_pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    idp_port, port = free_port(), free_port()
    issuer = f"http://127.0.0.1:{idp_port}"
    config = {
        "database_url": database_url,
        "jwt": {
            "issuer": issuer,
            "audience": f"http://127.0.0.1:{port}/mcp",
            "public_key_file": str(public_pem),
            "scopes": {"tasks.write": {}},
        },
    }
    with identity_provider(idp_port, private_pem), http_server(tmp_path, config, port=port) as url:
        project = await run_typescript_client(url, "through the identity provider")
    assert project["name"] == "through the identity provider"
    assert await audit_rows(db) == [(f"jwt:{issuer}#idp-user", "ts-sdk-oauth-check", "created")]


def test_hash_password_prints_an_operator_entry_whose_password_signs_in(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "mcp_server", "hash-password", "alice"],
        input=PASSWORD + "\n",
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    entry = json.loads(made.stdout.splitlines()[-1])
    assert entry["id"] == "alice" and PASSWORD not in made.stdout
    settings = Settings(operators=(OperatorConfig.model_validate(entry),))
    assert sign_in(settings, "alice", PASSWORD) == settings.operators[0]
    assert sign_in(settings, "alice", PASSWORD + "!") is None
    assert sign_in(settings, "bob", PASSWORD) is None
    short = subprocess.run(
        [sys.executable, "-m", "mcp_server", "hash-password", "alice"],
        input="short\n",
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert short.returncode == 2 and "at least 12 characters" in short.stderr


def test_the_built_in_server_is_refused_without_an_operator_or_an_agent_or_beside_jwt() -> None:
    hashed = hash_password(PASSWORD)
    operator = {"id": "alice", "password_scrypt": hashed}
    cases = {
        "no operator": ({"oauth": {}, "agents": [{"id": "a"}]}, "add an operator"),
        "only a read-only operator": (
            {"oauth": {}, "agents": [{"id": "a"}], "operators": [operator | {"read_only": True}]},
            "add an operator",
        ),
        "no agent": ({"oauth": {}, "operators": [operator]}, "add the agents"),
        "beside jwt": (
            {
                "oauth": {},
                "agents": [{"id": "a"}],
                "operators": [operator],
                "jwt": {"issuer": "https://idp", "audience": "x", "public_key_file": "/k.pem"},
            },
            "choose one authorization server",
        ),
    }
    for config, message in cases.values():
        with pytest.raises(ValueError, match=message):
            Settings.model_validate(config)


def server_log(folder: Path) -> str:
    return "".join(path.read_text() for path in folder.glob("server-*.log"))


async def test_guesses_sent_at_once_are_counted_before_any_password_is_checked(
    database_url: str, tmp_path: Path
) -> None:
    with http_server(tmp_path, oauth_config(database_url)) as url:
        async with httpx2.AsyncClient(timeout=60) as http:
            client = await flow(url, http)
            pages = [await client.consent_page() for _ in range(4)]
            answers: list[int] = []

            async def guess(n: int) -> None:
                answers.append((await client.decide(pages[n % 4], password=f"guess {n}")).status_code)

            async with anyio.create_task_group() as group:
                for n in range(20):
                    group.start_soon(guess, n)
            assert sorted(answers) == [401] * 5 + [429] * 15
            assert (await client.decide(pages[0])).status_code == 429  # locked out, the right password too
        log = server_log(tmp_path)
        assert log.count("a failed sign-in as operator 'alice'") == 5
        assert "operator alice is locked out" in log
        for page in pages:  # the access log keeps no query strings
            assert parse_qs(urlsplit(page).query)["request"][0] not in log
        assert "GET /authorize?… HTTP" in log


async def test_registration_admits_only_redirect_uris_a_code_may_go_to_and_small_metadata(
    database_url: str, tmp_path: Path
) -> None:
    with http_server(tmp_path, oauth_config(database_url)) as url:
        base = url.removesuffix("/mcp")
        async with httpx2.AsyncClient() as http:

            async def register(**metadata: Any) -> httpx2.Response:
                body = {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"} | metadata
                return await http.post(base + "/register", json=body)

            for uri in (
                "https://claude.ai/api/mcp/auth_callback",
                "http://localhost:6274/oauth/callback",
                "http://[::1]:33418/callback",
                "com.example.tasks:/oauth2redirect",
            ):
                assert (await register(redirect_uris=[uri])).status_code == 201, uri
            for uri in (
                "javascript:alert(document.domain)//",
                "data:text/html,<script>alert(1)</script>",
                "file:///etc/passwd",
                "http://evil.example.com/callback",
                "https://evil.example.com/callback#fragment",
                "https://user@tasks.example.com/callback",
            ):
                refused = await register(redirect_uris=[uri])
                assert refused.status_code == 400, uri
                assert refused.json()["error"] == "invalid_redirect_uri"
            too_many = await register(redirect_uris=[f"http://127.0.0.1:9/{n}" for n in range(11)])
            assert too_many.status_code == 400
            bulky = await register(contacts=[f"person{n}@example.com" for n in range(2000)])
            assert bulky.status_code == 400 and bulky.json()["error"] == "invalid_client_metadata"
            huge = await http.post(base + "/register", content=b"{" + b" " * 100_000 + b"}")
            assert huge.status_code == 413

            client = await flow(url, http)
            for _ in range(10):
                await client.consent_page()
            assert await client.refused(state="s" * 2000) == "invalid_request"
            assert await client.refused() == "temporarily_unavailable"


async def test_a_revocation_reaches_another_server_process_within_the_verified_time(
    database_url: str, tmp_path: Path
) -> None:
    config = oauth_config(database_url)
    with http_server(tmp_path, config) as first, http_server(tmp_path, config) as second:
        async with httpx2.AsyncClient() as http:
            client = await flow(first, http)
            tokens = await client.tokens()
            assert (await post(second, tokens["access_token"], json=INITIALIZE)).status_code == 200
            form = {"client_id": client.client_id, "client_secret": "", "token": tokens["refresh_token"]}
            assert (await http.post(client.base + "/revoke", data=form)).status_code == 200
            assert (await post(first, tokens["access_token"], json=INITIALIZE)).status_code == 401  # at once
            revoked_at = time.monotonic()
            with anyio.fail_after(VERIFIED_SECONDS + 10):
                while (await post(second, tokens["access_token"], json=INITIALIZE)).status_code == 200:  # noqa: ASYNC110  -- another process answers
                    await anyio.sleep(0.2)
            assert time.monotonic() - revoked_at <= VERIFIED_SECONDS + 1
