"""Fixtures: every database test runs on SQLite and on PostgreSQL; tools run through the protocol."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, Implementation, TextContent
from sqlalchemy import text
from sqlalchemy.engine import make_url

from mcp_server.chain import GENESIS
from mcp_server.checkpoints import Signer
from mcp_server.config import Settings
from mcp_server.db import Database, create_database, sql_log
from mcp_server.sealer import SEALER_TASK, Sealer, wait_until_sealed
from mcp_server.server import create_server

AGENT = "test-agent"
# Figures from the generated bad-input suite, printed at the end of the run.
FUZZ_TALLY: Counter[str] = Counter()
# The PostgreSQL server the tests use is TEST_POSTGRES_URL's; its database name is only the stem of
# this run's own databases, made with a name no other run shares and dropped when the run ends. A
# developer's server may hold other databases and other users: the tests touch none of them.
_SERVER_URL = make_url(
    os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/mcp_server_test")
)
RUN_DATABASE = f"{_SERVER_URL.database}_{os.getpid()}_{secrets.token_hex(3)}"
POSTGRES_URL = _SERVER_URL.set(database=RUN_DATABASE).render_as_string(hide_password=False)
# A login role for tests that play the server's application role: this run's too, dropped at the end.
APP_ROLE = f"{RUN_DATABASE}_app"
# A login role granted nothing but what every role has (CONNECT): an unrelated role on the same server.
OUTSIDER_ROLE = f"{RUN_DATABASE}_outsider"
_postgres_checked: str | None = None
_made_databases: set[str] = set()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # Test modules mark themselves `pytest.mark.anyio`: anyio's plugin keeps an async fixture's
    # setup and teardown in one task, which an MCP client's cancel scopes require.
    return "asyncio"


async def _admin() -> asyncpg.Connection:
    url = _SERVER_URL
    return await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, database="postgres"
    )


async def _postgres_problem(url_text: str = POSTGRES_URL) -> str | None:
    """None when PostgreSQL is reachable and this run's database `url_text` names is made afresh
    (empty), else why not."""
    name = make_url(url_text).database
    assert name is not None and name.startswith(RUN_DATABASE), (
        "the tests make and drop only their own databases"
    )
    try:
        admin = await _admin()
    except (OSError, asyncpg.PostgresError) as exc:
        return f"PostgreSQL at {_SERVER_URL.host}:{_SERVER_URL.port} is unreachable: {exc}"
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # this run's, made earlier
        await admin.execute(f'CREATE DATABASE "{name}"')
        _made_databases.add(name)
    finally:
        await admin.close()
    return None


async def _drop_made_databases() -> None:
    admin = await _admin()
    try:
        for name in sorted(_made_databases):
            # Only this run's, by their unique names; FORCE ends what a test left connected to them.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'DROP ROLE IF EXISTS "{APP_ROLE}"')  # its grants went with the databases
        await admin.execute(f'DROP ROLE IF EXISTS "{OUTSIDER_ROLE}"')
    finally:
        await admin.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _made_databases:
        asyncio.run(_drop_made_databases())


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    global _postgres_checked
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tasks.db'}"
        return
    if _postgres_checked is None:
        _postgres_checked = await _postgres_problem() or ""
    if _postgres_checked:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires PostgreSQL: {_postgres_checked}")
        pytest.skip(_postgres_checked)
    db = create_database(Settings(database_url=POSTGRES_URL))
    await db.open_schema(upgrade=True)
    async with db.engine.begin() as conn:
        # The audit log refuses TRUNCATE; a superuser in replica mode skips triggers, as a test reset may.
        await conn.execute(text("SET LOCAL session_replication_role = replica"))
        await conn.execute(
            text(
                "TRUNCATE audit_entry, audit_seal, audit_checkpoint, entity, idempotency_key, "
                "oauth_secret, oauth_grant, oauth_client, operator_sign_in, task_dependency, task_comment, "
                "write_budget, changeset_item, changeset, console_session, refusal_tally "
                "RESTART IDENTITY CASCADE"
            )
        )
        await conn.execute(
            text(
                "UPDATE audit_chain SET head_seq = 0, head_hash = :genesis, sealer = NULL, "
                "lease_until = NULL, horizon = pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
            ),
            {"genesis": GENESIS},
        )
        # A test that played the superuser may have switched the audit triggers off.
        for table in ("audit_entry", "audit_seal", "audit_checkpoint", "task_comment"):
            await conn.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))
    await db.dispose()
    yield POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgresql"])
async def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with no schema at all, made for the one test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    url_text = (
        make_url(POSTGRES_URL).set(database=f"{RUN_DATABASE}_empty").render_as_string(hide_password=False)
    )
    if problem := await _postgres_problem(url_text):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires PostgreSQL: {problem}")
        pytest.skip(problem)
    return url_text


@pytest.fixture
def settings(database_url: str) -> Settings:
    # Tests verify the audit log as often as they check it; the limit on that has its own test.
    return Settings(database_url=database_url, agent_id=AGENT, verify_interval_seconds=0)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    """A second connection to the test database, to look at rows behind the server's back."""
    database = create_database(settings)
    await database.open_schema(upgrade=True)
    yield database
    await database.dispose()


@pytest.fixture(params=["legacy", "auto"])
def era(request: pytest.FixtureRequest) -> str:
    """'legacy': the initialize handshake (2025-11-25); 'auto': the stateless 2026-07-28 protocol."""
    return str(request.param)


def connect(settings: Settings, era: str, name: str = AGENT, *, client_name: str = "test-client") -> Client:
    """An in-process client acting as agent `name` (the configured identity, as on stdio)."""
    as_agent = settings.model_copy(update={"agent_id": name})
    info = Implementation(name=client_name, version="1")
    return Client(create_server(as_agent), mode=era, client_info=info)  # type: ignore[arg-type]


@pytest.fixture
async def client(settings: Settings, era: str, db: Database) -> AsyncIterator[Client]:
    async with connect(settings, era) as c:
        yield c


async def call(client: Client, tool: str, arguments: dict[str, Any] | None = None) -> Any:
    result = await client.call_tool(tool, arguments or {})
    assert not result.is_error, error_text(result)
    return result.structured_content


async def call_error(client: Client, tool: str, arguments: dict[str, Any]) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, f"{tool} should have failed but returned {result.structured_content}"
    return error_text(result)


def initialize_message(client_name: str, request_id: int = 1) -> dict[str, Any]:
    """A raw JSON-RPC `initialize` request, for tests that speak the protocol by hand."""
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": client_name, "version": "1"},
        },
    }


def error_text(result: CallToolResult) -> str:
    return " ".join(block.text for block in result.content if isinstance(block, TextContent))


@contextmanager
def statements_sent() -> Iterator[list[tuple[str, Any]]]:
    """Every statement sent to a database driver for a tool call in the block, with its
    parameters, as the server logs them at DEBUG (`mcp_server.db.sql_log`); not the statements of
    the audit sealer, which runs beside the calls in its own task."""
    sent: list[tuple[str, Any]] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            task = asyncio.current_task()
            if task is None or task.get_name() != SEALER_TASK:
                sent.append((record.getMessage(), getattr(record, "parameters", None)))

    catch, level = Catch(), sql_log.level
    sql_log.addHandler(catch)
    sql_log.setLevel(logging.DEBUG)
    try:
        yield sent
    finally:
        sql_log.removeHandler(catch)
        sql_log.setLevel(level)


async def as_app_role(db: Database, database_url: str) -> str:
    """The URL of `database_url` as this run's application role (made if need be), granted what
    the server needs by `grant-app-role`. PostgreSQL."""
    async with db.engine.begin() as conn:
        await conn.execute(
            text(
                f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') "
                f"THEN CREATE ROLE {APP_ROLE} LOGIN; END IF; END $$"
            )
        )
    granted = await anyio.run_process(
        [sys.executable, "-m", "mcp_server", "grant-app-role", APP_ROLE],
        env={**os.environ, "DATABASE_URL": database_url},
        check=False,
    )
    assert granted.returncode == 0, granted.stderr.decode()
    return make_url(database_url).set(username=APP_ROLE).render_as_string(hide_password=False)


async def as_outsider(db: Database, database_url: str) -> str:
    """The URL of `database_url` as this run's outsider role (made if need be): a role that can
    connect, as any role can by default, and was granted nothing. PostgreSQL."""
    async with db.engine.begin() as conn:
        await conn.execute(
            text(
                f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{OUTSIDER_ROLE}') "
                f"THEN CREATE ROLE {OUTSIDER_ROLE} LOGIN; END IF; END $$"
            )
        )
    return make_url(database_url).set(username=OUTSIDER_ROLE).render_as_string(hide_password=False)


async def count_rows(db: Database, table: str) -> int:
    async with db.engine.connect() as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())  # noqa: S608


async def snapshot(db: Database) -> list[Any]:
    """Every row of every table, to show that a rejected call changed nothing."""
    async with db.engine.connect() as conn:
        entities = (await conn.execute(text("SELECT * FROM entity ORDER BY id"))).all()
        entries = (await conn.execute(text("SELECT * FROM audit_entry ORDER BY id"))).all()
        keys = (await conn.execute(text("SELECT * FROM idempotency_key ORDER BY agent_id, key"))).all()
    return [tuple(row) for row in entities] + [tuple(row) for row in entries] + [tuple(row) for row in keys]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def http_server(
    tmp_path: Path,
    config: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
    port: int | None = None,
) -> Iterator[str]:
    """`mcp-task-server serve --transport http` in a subprocess (on `port`, else a free one);
    yields its MCP endpoint URL."""
    port = port or free_port()
    config_file = tmp_path / f"config-{port}.json"
    config_file.write_text(json.dumps(config))
    log = (tmp_path / f"server-{port}.log").open("w")
    command = [
        sys.executable,
        "-m",
        "mcp_server",
        "--config",
        str(config_file),
        "serve",
        "--transport",
        "http",
    ]
    process = subprocess.Popen(
        [*command, "--port", str(port), *extra_args],
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError(f"the HTTP server exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.1)  # polling for readiness, not waiting for a result
    raise RuntimeError("the HTTP server did not start listening within 30 s")


@asynccontextmanager
async def http_client(
    url: str, token: str | None, *, era: str = "legacy", client_name: str = "http-test-client"
) -> AsyncIterator[Client]:
    """The SDK's client over streamable HTTP, sending `token` as its bearer token (if any)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    # The SDK's own client's timeouts: a response stream stays open as long as the call runs.
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http:
        transport = streamable_http_client(url, http_client=http)
        info = Implementation(name=client_name, version="1")
        async with Client(transport, mode=era, client_info=info) as client:  # type: ignore[arg-type]
            yield client


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FUZZ_TALLY:
        figures = ", ".join(f"{name}: {count}" for name, count in FUZZ_TALLY.items())
        terminalreporter.write_line(f"generated bad input: {figures}")


async def seal_all(settings: Settings, db: Database) -> None:
    """Seal every audit entry committed so far, as the sealer of a running server would."""
    sealer = Sealer(db, settings, Signer.of(settings))
    assert await wait_until_sealed(sealer, 30), "entries were left unsealed"
