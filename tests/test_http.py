"""Streamable HTTP: a real server process, the SDK client with a bearer token, on both databases."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import text

from mcp_server.auth import mint_token, token_sha256
from mcp_server.checkpoints import generate
from mcp_server.config import Settings
from mcp_server.db import Database
from tests.conftest import call, call_error, http_client, http_server, initialize_message, seal_all
from tests.test_permissions import READING_TOOLS

pytestmark = pytest.mark.anyio

ISSUER = "https://id.example.com"
AUDIENCE = "mcp-task-server"
SECRET = "a shared secret for HS256, long enough for the test"
INITIALIZE = initialize_message("raw")
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def signed(key: Any, algorithm: str = "HS256", headers: dict[str, Any] | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "ci-bot", "scope": "tasks.write", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300}
    payload |= claims
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


async def post(url: str, token: str | None, **kwargs: Any) -> httpx2.Response:
    headers = dict(MCP_HEADERS)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    headers |= kwargs.pop("headers", {})
    async with httpx2.AsyncClient() as raw:
        return await raw.post(url, headers=headers, **kwargs)


async def audit_rows(db: Database) -> list[tuple[Any, ...]]:
    async with db.engine.connect() as conn:
        query = "SELECT changed_by, client_name, action FROM audit_entry ORDER BY id"
        return [tuple(row) for row in (await conn.execute(text(query))).all()]


async def entity_rows(db: Database) -> list[tuple[Any, ...]]:
    async with db.engine.connect() as conn:
        return [tuple(row) for row in (await conn.execute(text("SELECT * FROM entity ORDER BY id"))).all()]


async def test_http_admits_only_valid_tokens_and_records_the_identity_each_proves(
    database_url: str, tmp_path: Path, db: Database
) -> None:
    planner, viewer = mint_token(), mint_token()
    config = {
        "database_url": database_url,
        "agents": [
            {"id": "planner", "token_sha256": token_sha256(planner)},
            {"id": "viewer", "token_sha256": token_sha256(viewer), "read_only": True},
        ],
        "jwt": {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "algorithms": ["HS256"],
            "scopes": {"tasks.read": {"read_only": True}, "tasks.write": {}},
        },
        "http_max_body_bytes": 4096,
    }
    with http_server(tmp_path, config, env={"MCP_JWT_SECRET": SECRET}) as url:
        refused = {
            "no token": None,
            "unknown token": mint_token(),
            "altered token": planner[:-2] + ("AA" if not planner.endswith("AA") else "BB"),
            "expired JWT": signed(SECRET, exp=int(time.time()) - 3600),
            "JWT for another audience": signed(SECRET, aud="another-service"),
            "JWT from another issuer": signed(SECRET, iss="https://evil.example.com"),
            "JWT signed with another key": signed("not the shared secret, but just as long as it"),
            "JWT without a subject": jwt.encode(
                {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300}, SECRET, algorithm="HS256"
            ),
        }
        for case, token in refused.items():
            response = await post(url, token, json=INITIALIZE)
            assert response.status_code == 401, case
            assert response.headers["www-authenticate"].lower().startswith("bearer"), case
        # A JWT that expired within the leeway (30 s by default) still admits: clocks differ.
        response = await post(url, signed(SECRET, exp=int(time.time()) - 10), json=INITIALIZE)
        assert response.status_code == 200, response.text

        for era in ("legacy", "auto"):
            async with http_client(url, planner, era=era, client_name="planner-ui") as client:
                project = await call(client, "create_project", {"name": f"Project {era}"})
                await call(client, "create_task", {"title": "from HTTP", "project_id": project["id"]})
        async with http_client(url, signed(SECRET), client_name="ci") as client:
            await call(client, "create_task", {"title": "from CI", "project_id": project["id"]})
        assert await audit_rows(db) == [
            ("planner", "planner-ui", "created"),
            ("planner", "planner-ui", "created"),
            ("planner", "planner-ui", "created"),
            ("planner", "planner-ui", "created"),
            (f"jwt:{ISSUER}#ci-bot", "ci", "created"),
        ]
        # A JWT whose subject is a configured agent's id proves another identity: its own entries,
        # its own idempotency keys.
        same_key = {
            "title": "once",
            "project_id": project["id"],
            "idempotency_key": "shared-key",
            "allow_duplicate": True,
        }
        async with http_client(url, planner) as client:
            first = await call(client, "create_task", same_key)
        async with http_client(url, signed(SECRET, sub="planner"), client_name="ci") as client:
            second = await call(client, "create_task", same_key)
        assert second["id"] != first["id"]
        assert (await audit_rows(db))[-2:] == [
            ("planner", "http-test-client", "created"),
            (f"jwt:{ISSUER}#planner", "ci", "created"),
        ]

        entities = await entity_rows(db)
        for token in (viewer, signed(SECRET, sub="reader", scope="tasks.read")):
            async with http_client(url, token) as client:
                assert {tool.name for tool in (await client.list_tools()).tools} == READING_TOOLS
                assert (await call(client, "search_tasks", {}))["items"]
                message = await call_error(
                    client, "create_task", {"title": "no", "project_id": project["id"]}
                )
                assert "permission write" in message
        assert await entity_rows(db) == entities
        assert (await audit_rows(db))[-2:] == [
            ("viewer", "http-test-client", "refused"),
            (f"jwt:{ISSUER}#reader", "http-test-client", "refused"),
        ]

        # The SDK's DNS-rebinding protection and body limit sit behind authentication.
        response = await post(url, planner, json=INITIALIZE, headers={"Host": "evil.example.com"})
        assert response.status_code == 421
        response = await post(url, planner, content=json.dumps({**INITIALIZE, "pad": "x" * 5000}))
        assert response.status_code == 413


def rsa_key() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, public.decode()


@pytest.mark.parametrize("source", ["public_key_file", "jwks_file"])
async def test_jwts_signed_by_an_identity_providers_key_are_verified(
    database_url: str, tmp_path: Path, db: Database, source: str
) -> None:
    key, public_pem = rsa_key()
    other_key, _ = rsa_key()
    key_file = tmp_path / "key"
    if source == "public_key_file":
        key_file.write_text(public_pem)
    else:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        key_file.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    config = {
        "database_url": database_url,
        "jwt": {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "algorithms": ["RS256"],
            source: str(key_file),
            "scopes": {"tasks.write": {"tools": ["create_project"]}},
        },
    }
    headers = {"kid": "k1"}
    with http_server(tmp_path, config) as url:
        assert (await post(url, signed(other_key, "RS256", headers), json=INITIALIZE)).status_code == 401
        assert (await post(url, signed(SECRET, "HS256", headers), json=INITIALIZE)).status_code == 401
        async with http_client(url, signed(key, "RS256", headers, sub="idp-agent")) as client:
            await call(client, "create_project", {"name": "Signed"})
            message = await call_error(client, "search_tasks", {})
            assert "tool:search_tasks" in message
    assert [row[0::2] for row in await audit_rows(db)] == [
        (f"jwt:{ISSUER}#idp-agent", "created"),
        (f"jwt:{ISSUER}#idp-agent", "refused"),
    ]


async def test_two_stateless_server_processes_share_one_database_without_lost_or_misattributed_changes(
    database_url: str, tmp_path: Path, db: Database
) -> None:
    """16 agents on PostgreSQL (4 on SQLite, which has one writer at a time) spread over two
    server processes: no call fails, every change has exactly its audit entries, and both
    processes' sealers (one at a time) seal them all into one chain with signed checkpoints."""
    agents = 4 if db.is_sqlite else 16
    tokens = {f"agent-{n}": mint_token() for n in range(agents)}
    key = tmp_path / "audit-key.pem"
    generate(key)
    checkpoints = tmp_path / "checkpoints.jsonl"
    config = {
        "database_url": database_url,
        "agents": [{"id": agent, "token_sha256": token_sha256(token)} for agent, token in tokens.items()],
        "audit_signing_key_file": str(key),
        "checkpoint_interval_seconds": 0.2,
        "checkpoint_file": str(checkpoints),
    }
    with (
        http_server(tmp_path, config, extra_args=["--stateless"]) as first,
        http_server(tmp_path, config, extra_args=["--stateless"]) as second,
    ):
        async with http_client(first, tokens["agent-0"]) as setup:
            project = await call(setup, "create_project", {"name": "Shared"})
        created: dict[str, list[int]] = {}

        async def agent(n: int, name: str, token: str) -> None:
            created[name] = []
            # Each agent alternates between the two processes, call by call.
            clients = [http_client(url, token, era="auto") for url in (first, second)]
            async with clients[0] as a, clients[1] as b:
                for i in range(6):
                    client = (a, b)[(i + n) % 2]
                    task = await call(
                        client, "create_task", {"title": f"{name} {i}", "project_id": project["id"]}
                    )
                    created[name].append(task["id"])
                    await call(client, "update_task", {"task_id": task["id"], "status": "in_progress"})
                    mine = {"field": "title", "op": "contains", "value": f"{name} "}
                    await call(client, "bulk_update_status", {"status": "blocked", "filter": mine})

        async with anyio.create_task_group() as group:
            for n, (name, token) in enumerate(tokens.items()):
                group.start_soon(agent, n, name, token)

        await seal_all(Settings(database_url=database_url), db)  # the servers' sealers seal them
        async with http_client(second, tokens["agent-1"]) as reader:
            report = await call(reader, "verify_audit_log", {})

    async with db.engine.connect() as conn:
        tasks = (await conn.execute(text("SELECT id, title, status FROM entity WHERE kind = 'task'"))).all()
        entries = (
            await conn.execute(
                text(
                    "SELECT entity_id, changed_by, action FROM audit_entry "
                    "WHERE entity_id IS NOT NULL ORDER BY id"
                )
            )
        ).all()
    assert len(tasks) == agents * 6 and all(status == "blocked" for _, _, status in tasks)
    owner = {task_id: name for name, ids in created.items() for task_id in ids}
    assert {title.split()[0] for _, title, _ in tasks} == set(tokens)
    for entity_id, changed_by, action in entries:
        if entity_id != project["id"]:
            assert changed_by == owner[entity_id], f"task {entity_id}: {action} recorded under {changed_by}"
    per_task = {task_id: [a for e, _, a in entries if e == task_id] for task_id in owner}
    # created, set in_progress, then blocked by its agent's bulk update: each exactly once.
    assert all(actions == ["created", "updated", "updated"] for actions in per_task.values())
    assert report["ok"] and report["entries_checked"] == len(entries) and report["unsealed"] == 0
    assert report["checkpoints_checked"] >= 1, report
    kept = [json.loads(line) for line in checkpoints.read_text().splitlines()]
    assert kept and max(c["seq"] for c in kept) <= report["head_seq"]


async def test_a_browser_client_gets_cors_before_and_after_authentication(
    database_url: str, tmp_path: Path
) -> None:
    token = mint_token()
    origin = "https://app.example.com"
    config = {
        "database_url": database_url,
        "agents": [{"id": "browser", "token_sha256": token_sha256(token)}],
        "allowed_origins": [origin],
    }
    with http_server(tmp_path, config) as url:
        async with httpx2.AsyncClient() as raw:
            # The preflight carries no token: it is answered before authentication.
            preflight = await raw.options(
                url,
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type, mcp-protocol-version",
                },
            )
            assert preflight.status_code == 200, preflight.text
            assert preflight.headers["access-control-allow-origin"] == origin
            assert "POST" in preflight.headers["access-control-allow-methods"]
            assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
            # A request without a token: 401, readable by the page, with WWW-Authenticate exposed.
            refused = await raw.post(url, headers={**MCP_HEADERS, "Origin": origin}, json=INITIALIZE)
            assert refused.status_code == 401
            assert refused.headers["access-control-allow-origin"] == origin
            exposed = refused.headers["access-control-expose-headers"].lower()
            assert "www-authenticate" in exposed and "mcp-session-id" in exposed
            # Another site's page gets no CORS headers and is refused by the Origin check.
            other = await raw.options(
                url, headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"}
            )
            assert "access-control-allow-origin" not in other.headers
        answered = await post(url, token, json=INITIALIZE, headers={"Origin": origin})
        assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == origin
        assert "mcp-session-id" in answered.headers
        hostile = await post(url, token, json=INITIALIZE, headers={"Origin": "https://evil.example.com"})
        assert hostile.status_code == 403 and "access-control-allow-origin" not in hostile.headers


async def test_a_stateless_server_answers_get_and_delete_with_405(database_url: str, tmp_path: Path) -> None:
    token = mint_token()
    config = {"database_url": database_url, "agents": [{"id": "a", "token_sha256": token_sha256(token)}]}
    with http_server(tmp_path, config, extra_args=["--stateless"]) as url:
        async with httpx2.AsyncClient() as raw:
            for method in ("GET", "DELETE"):
                response = await raw.request(
                    method, url, headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
                )
                assert response.status_code == 405, method
                assert response.headers["allow"] == "POST" and "stateless" in response.text
        async with http_client(url, token) as client:
            assert (await call(client, "search_tasks", {}))["items"] == []


async def test_an_oauth_client_finds_the_identity_provider_from_the_401(
    database_url: str, tmp_path: Path
) -> None:
    config = {
        "database_url": database_url,
        "jwt": {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "algorithms": ["HS256"],
            "scopes": {"tasks.write": {}},
        },
        "public_url": "https://tasks.example.com",
    }
    with http_server(tmp_path, config, env={"MCP_JWT_SECRET": SECRET}) as url:
        refused = await post(url, None, json=INITIALIZE)
        assert refused.status_code == 401
        challenge = refused.headers["www-authenticate"]
        metadata_url = "https://tasks.example.com/.well-known/oauth-protected-resource/mcp"
        assert challenge.lower().startswith("bearer") and f'resource_metadata="{metadata_url}"' in challenge
        async with httpx2.AsyncClient() as raw:  # the same document, served by this process (RFC 9728)
            metadata = (
                await raw.get(url.removesuffix("/mcp") + "/.well-known/oauth-protected-resource/mcp")
            ).json()
        assert metadata["resource"] == "https://tasks.example.com/mcp"
        assert metadata["authorization_servers"] == [ISSUER]
        async with http_client(url, signed(SECRET)) as client:  # a token from that issuer is accepted
            assert (await call(client, "search_tasks", {}))["items"] == []


async def test_static_tokens_alone_publish_no_oauth_metadata(database_url: str, tmp_path: Path) -> None:
    config = {
        "database_url": database_url,
        "agents": [{"id": "a", "token_sha256": token_sha256(mint_token())}],
    }
    with http_server(tmp_path, config) as url:
        refused = await post(url, None, json=INITIALIZE)
        assert refused.status_code == 401 and "resource_metadata" not in refused.headers["www-authenticate"]
        async with httpx2.AsyncClient() as raw:
            missing = await raw.get(url.removesuffix("/mcp") + "/.well-known/oauth-protected-resource/mcp")
        assert missing.status_code == 404


async def test_development_mode_serves_loopback_without_tokens_as_the_configured_agent(
    database_url: str, tmp_path: Path, db: Database
) -> None:
    config = {"database_url": database_url, "agent_id": "dev-agent"}
    with http_server(tmp_path, config, extra_args=["--dev-without-auth"]) as url:
        async with http_client(url, None) as client:  # no token at all
            await call(client, "create_project", {"name": "made in dev"})
    assert await audit_rows(db) == [("dev-agent", "http-test-client", "created")]
    [log] = [path async for path in anyio.Path(tmp_path).glob("server-*.log")]
    logged = await log.read_text()
    assert "DEVELOPMENT MODE" in logged and "WITHOUT AUTHENTICATION" in logged
