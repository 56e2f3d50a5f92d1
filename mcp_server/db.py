"""Engine, sessions and transactions; everything that differs between SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import event, func, inspect
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.util import await_only
from sqlmodel import SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import chain, models
from mcp_server.config import Settings
from mcp_server.errors import StartupError

SQLITE_BUSY_TIMEOUT_MS = 5000
PING_AFTER_IDLE_SECONDS = 10.0
APPLICATION_NAME = "mcp-task-server"

chain.attach(models.AUDIT_TABLE)


class Database:
    """The engine and the session factory; a tool call opens one transaction through it."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[AsyncSession]:
        """One transaction: commits when the block ends, rolls back when it raises.

        Writers take turns, because each appends to the one audit chain. On SQLite a writing
        transaction takes the write lock at BEGIN (BEGIN IMMEDIATE), so two writers queue on the
        busy timeout instead of failing when a reader upgrades to a writer. On PostgreSQL it takes
        the chain's advisory lock before any row lock, so writers never deadlock over the chain.
        """
        async with self._sessions() as session, session.begin():
            if write and self.is_sqlite:
                await session.connection(execution_options={"sqlite_begin": "BEGIN IMMEDIATE"})
            elif write:
                await session.exec(select(func.pg_advisory_xact_lock(chain.CHAIN_LOCK_KEY)))
            elif not self.is_sqlite:
                # Under READ COMMITTED each statement reads its own snapshot, inside a transaction
                # or not; without one a read costs one round trip instead of three (BEGIN, COMMIT).
                await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
            yield session

    async def create_schema(self) -> None:
        where = self.engine.url.render_as_string(hide_password=True)
        try:
            async with self.engine.begin() as conn:
                await conn.run_sync(SQLModel.metadata.create_all)
                missing = await conn.run_sync(_missing_columns)
        except (SQLAlchemyError, OSError) as exc:
            reason = exc.orig if isinstance(exc, DBAPIError) else exc
            raise StartupError(f"cannot open the database {where}: {reason}") from exc
        if missing:
            raise StartupError(
                f"the database {where} was created by an earlier version (it lacks {', '.join(missing)}); "
                "start from a new database (schema migrations are not available yet)"
            )

    async def dispose(self) -> None:
        await self.engine.dispose()


def _missing_columns(conn: Connection) -> list[str]:
    """Columns the models have and the database's existing tables lack."""
    inspector = inspect(conn)
    return [
        f"{table.name}.{column.name}"
        for table in SQLModel.metadata.sorted_tables
        for present in [{c["name"] for c in inspector.get_columns(table.name)}]
        for column in table.columns
        if column.name not in present
    ]


def create_database(settings: Settings) -> Database:
    url = make_url(settings.async_database_url)
    kwargs: dict[str, Any] = {
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
    }
    if url.get_backend_name() == "postgresql":
        # Per statement, so a pathological filter or a held lock ends the call instead of hanging it.
        kwargs["connect_args"] = {
            "server_settings": {
                "application_name": APPLICATION_NAME,  # how operators find its sessions in pg_stat_activity
                "statement_timeout": str(settings.statement_timeout_ms),
                "lock_timeout": str(settings.lock_timeout_ms),
            }
        }
    engine = create_async_engine(url, **kwargs)
    if url.get_backend_name() == "postgresql":
        _check_on_checkout(engine)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        _configure_sqlite(engine)
    return Database(engine)


def grant_app_role(conn: Connection, role: str) -> None:
    """PostgreSQL: grant an existing role what the server needs and nothing more.

    It may read, insert and update tasks and projects (deleting is soft, so no DELETE), and read
    and append to the audit log: no UPDATE, DELETE or TRUNCATE there, so even with the
    triggers dropped the role cannot rewrite the record.
    """
    quote = conn.dialect.identifier_preparer.quote
    schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
    for statement in (
        f"GRANT USAGE ON SCHEMA {quote(schema)} TO {quote(role)}",
        f"REVOKE ALL ON entity, audit_entry, idempotency_key FROM {quote(role)}",
        f"GRANT SELECT, INSERT, UPDATE ON entity TO {quote(role)}",
        f"GRANT SELECT, INSERT ON audit_entry TO {quote(role)}",
        f"GRANT SELECT, INSERT, DELETE ON idempotency_key TO {quote(role)}",
        f"GRANT USAGE ON SEQUENCE entity_id_seq, audit_entry_id_seq TO {quote(role)}",
    ):
        conn.exec_driver_sql(statement)


def _check_on_checkout(engine: AsyncEngine) -> None:
    """Hand out only live connections, without a round trip on every call.

    A connection the server closed (a restart, an administrator's terminate) is already marked
    closed by the time it is checked out, because the event loop saw the close while the server
    waited for the next call; one idle for a while is pinged, since a network path can drop it
    without a word. The pool replaces either. `pool_pre_ping` would cost three round trips per
    call instead (BEGIN, a query, ROLLBACK).
    """

    @event.listens_for(engine.sync_engine, "connect")
    @event.listens_for(engine.sync_engine, "checkin")
    def on_idle(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def on_checkout(_dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        connection = record.driver_connection
        if connection is None or connection.is_closed():
            raise DisconnectionError("connection closed while idle")
        if time.monotonic() - record.info.get("idle_since", 0.0) > PING_AFTER_IDLE_SECONDS:
            try:
                await_only(connection.execute("SELECT 1"))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise DisconnectionError("connection failed its ping") from exc


def _configure_sqlite(engine: AsyncEngine) -> None:
    # pysqlite's own transaction handling issues BEGIN lazily and never BEGIN IMMEDIATE; switch it
    # off and issue BEGIN ourselves (the recipe in SQLAlchemy's SQLite dialect documentation).
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
        dbapi_connection.create_function(
            "audit_entry_hash", len(chain.CONTENT) + 1, chain.sqlite_entry_hash, deterministic=True
        )

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))


class json_object(FunctionElement[dict[str, Any]]):
    """`json_object(key, value, ...)` in SQL: builds an audit value inside a set-based statement."""

    type = models.JSONValue  # type: ignore[assignment]  # JSON on SQLite, JSONB on PostgreSQL
    inherit_cache = True


@compiles(json_object, "postgresql")
def _json_object_pg(element: json_object, compiler: SQLCompiler, **kw: Any) -> str:
    return f"jsonb_build_object({compiler.process(element.clauses, **kw)})"


@compiles(json_object, "sqlite")
def _json_object_sqlite(element: json_object, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_object({compiler.process(element.clauses, **kw)})"
