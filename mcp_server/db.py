"""Engine, connections and transactions; everything that differs between SQLite and PostgreSQL.

A tool call gets one `Conn` (`Database.connect`) and runs its statements through it. The
statements are SQLAlchemy Core, built once and kept by the data functions. On PostgreSQL each
is compiled once into asyncpg's SQL, the conversions of its values and columns (priority ranks,
UTC times, JSON) taken from the column types, and then run on the asyncpg connection itself:
a call costs its round trips and little else. On SQLite they run through SQLAlchemy Core.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import sqlalchemy.ext.asyncio
from pydantic_core import from_json
from sqlalchemy import ARRAY, JSON, Boolean, ColumnElement, Dialect, String, Table, event, true
from sqlalchemy import func as sql_func
from sqlalchemy import select as sql_select
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.sql import Delete, FromClause, Insert, Select, TextClause, Update, bindparam, literal_column
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeDecorator, TypeEngine
from sqlalchemy.util import await_only
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from mcp_server import chain, models, schema
from mcp_server.config import Settings
from mcp_server.errors import StartupError, is_disconnect

# Every statement sent to a driver, at DEBUG: its SQL in the message, its values only in the record
# (`parameters`), never in the text of the log.
logger = logging.getLogger(__name__)
sql_log = logging.getLogger("mcp_server.sql")

SQLITE_BUSY_TIMEOUT_MS = 5000
PING_AFTER_IDLE_SECONDS = 10.0
APPLICATION_NAME = "mcp-task-server"
PLAN_CACHE_SIZE = 1024

Statement = Select[Any] | Insert | Update | Delete | TextClause
Row = Sequence[Any]
Params = Mapping[str, Any]
ReadBack = Callable[[FromClause], Select[Any]]
FollowUp = Callable[[FromClause], Insert]


class Conn:
    """One tool call's connection to the database.

    `rows`, `row` and `execute` run one statement. `change_one` runs a change to one row with
    RETURNING, a follow-up insert that reads the changed row (its audit entry), and a read-back
    of the row: on PostgreSQL as one statement, so in one round trip.

    A connection opened for a single statement (`Database.connect(..., single_statement=True)`)
    has no transaction around it: on PostgreSQL that statement is its own transaction, which is
    atomic. Its one change must come first, and a statement after a change that changed something
    is refused as the bug it would be (see `_start`).
    """

    is_sqlite: bool

    def __init__(self, *, single_statement: bool) -> None:
        self._single = single_statement
        self._statements = 0
        self._changed = False

    def _start(self, *, changes: bool) -> None:
        """Count a statement. For a single statement, the change must come first and, once it has
        changed something, nothing may follow it; reads may follow a change that changed nothing,
        to say why."""
        if self._single and (self._changed or (self._statements == 0 and not changes)):
            raise RuntimeError("a connection opened for a single statement was asked to run another")
        self._statements += 1

    async def rows(self, statement: Statement, params: Params | None = None) -> Sequence[Row]:
        raise NotImplementedError

    async def row(self, statement: Statement, params: Params | None = None) -> Row | None:
        """The first row of a statement's rows, or None."""
        rows = await self.rows(statement, params)
        return rows[0] if rows else None

    async def execute(self, statement: Statement, params: Params | None = None) -> int:
        """Run a statement that returns no rows; how many rows it changed."""
        raise NotImplementedError

    async def change_one(
        self, change: Update | Insert, follow: FollowUp, read_back: ReadBack, params: Params
    ) -> Row | None:
        """Change one row of `change.table`; insert `follow(changed)`; return `read_back(changed)`.

        `changed` stands for the changed row with every column of the table. None when `change`
        changed nothing, in which case nothing was inserted either.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class _Plan:
    """A statement compiled for asyncpg: its SQL, how to bind its values, how to read its columns."""

    sql: str
    binds: tuple[tuple[str, Callable[[Any], Any] | None, bool, Any], ...]  # name, convert, given, value
    convert: tuple[tuple[int, Callable[[Any], Any]], ...]  # (column position, conversion) where needed

    def args(self, params: Params) -> list[Any]:
        args = []
        for name, convert, given, value in self.binds:
            if given:
                args.append(value)
            else:
                value = params[name]
                args.append(value if convert is None or value is None else convert(value))
        return args

    def read(self, records: list[Any]) -> Sequence[Row]:
        if not self.convert:
            return records
        rows = []
        for record in records:
            row = list(record)
            for i, convert in self.convert:
                if row[i] is not None:
                    row[i] = convert(row[i])
            rows.append(row)
        return rows


def _compile(statement: Statement, dialect: Dialect) -> _Plan:
    compiled = statement.compile(dialect=dialect)
    sql = str(compiled)
    if "POSTCOMPILE" in sql:
        raise ValueError("an expanding IN cannot run on the driver; compare with db.one_of instead")
    if defaulted := [column.key for column in (*compiled.insert_prefetch, *compiled.update_prefetch)]:
        raise ValueError(f"give {', '.join(defaulted)} a value: defaults computed in Python do not run here")
    binds = []
    for name in compiled.positiontup or ():
        bind = compiled.binds[name]
        convert = bind.type.dialect_impl(dialect).bind_processor(dialect)
        given = not bind.required
        value = bind.effective_value if given else None
        if given and convert is not None and value is not None:
            value = convert(value)
        binds.append((name, convert, given, value))
    columns = getattr(statement, "exported_columns", ())
    readers = [column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns]
    return _Plan(sql, tuple(binds), tuple((i, read) for i, read in enumerate(readers) if read is not None))


class _PostgresConn(Conn):
    is_sqlite = False

    def __init__(self, driver: Any, plan: Callable[[Statement], _Plan], *, single_statement: bool) -> None:
        super().__init__(single_statement=single_statement)
        self._driver = driver
        self._plan = plan

    async def rows(self, statement: Statement, params: Params | None = None) -> Sequence[Row]:
        self._start(changes=False)
        return await self._fetch(statement, params or {})

    async def execute(self, statement: Statement, params: Params | None = None) -> int:
        self._start(changes=True)
        plan = self._plan(statement)
        args = plan.args(params or {})
        _sent(plan.sql, args)
        status: str = await self._driver.execute(plan.sql, *args)
        # asyncpg returns the command tag, e.g. "UPDATE 3" or "INSERT 0 3".
        last = status.rsplit(" ", 1)[-1]
        count = int(last) if last.isdigit() else 0
        self._changed = count > 0
        return count

    async def change_one(
        self, change: Update | Insert, follow: FollowUp, read_back: ReadBack, params: Params
    ) -> Row | None:
        self._start(changes=True)
        rows = await self._fetch(_one_statement(change, follow, read_back), params)
        self._changed = bool(rows)
        return rows[0] if rows else None

    async def _fetch(self, statement: Statement, params: Params) -> Sequence[Row]:
        plan = self._plan(statement)
        args = plan.args(params)
        _sent(plan.sql, args)
        return plan.read(await self._driver.fetch(plan.sql, *args))


def _sent(sql: str, parameters: Sequence[Any]) -> None:
    if sql_log.isEnabledFor(logging.DEBUG):
        sql_log.debug("%s", sql, extra={"parameters": parameters})


# The audit chain's lock, taken inside a single-statement change before its row is locked:
# writers that take the chain lock first and then row locks (every writing transaction) can then
# never deadlock with it. The UPDATE joins this one-row CTE, so it cannot produce, and so cannot
# lock, its row before the lock is held.
_CHAIN_LOCK = (
    sql_select(true().label("held"))
    .select_from(sql_func.pg_advisory_xact_lock(literal_column(str(chain.CHAIN_LOCK_KEY))))
    .cte("chain_lock")
    .prefix_with("MATERIALIZED")
)


@lru_cache(maxsize=128)
def _one_statement(change: Update | Insert, follow: FollowUp, read_back: ReadBack) -> Select[Any]:
    """PostgreSQL: change, follow-up and read-back as one statement of data-modifying CTEs."""
    if isinstance(change, Update):
        change = change.where(_CHAIN_LOCK.c.held)
    changed = change.returning(*change.table.c).cte("changed")
    return read_back(changed).add_cte(follow(changed).cte("follow_up"))


class _SqliteConn(Conn):
    is_sqlite = True

    def __init__(self, conn: AsyncConnection, *, single_statement: bool) -> None:
        super().__init__(single_statement=single_statement)
        self._conn = conn

    async def rows(self, statement: Statement, params: Params | None = None) -> Sequence[Row]:
        self._start(changes=False)
        return (await self._conn.execute(statement, dict(params or {}))).all()

    async def execute(self, statement: Statement, params: Params | None = None) -> int:
        self._start(changes=True)
        result = await self._conn.execute(statement, dict(params or {}))
        count = int(result.rowcount)
        self._changed = count > 0
        return count

    async def change_one(
        self, change: Update | Insert, follow: FollowUp, read_back: ReadBack, params: Params
    ) -> Row | None:
        # A writer holds SQLite's write lock for its whole transaction: three statements are as
        # safe as one, and cost no round trips.
        self._start(changes=True)
        returning, follow_up, reading = _three_statements(change, follow, read_back)
        changed = (await self._conn.execute(returning, dict(params))).first()
        if changed is None:
            return None
        self._changed = True
        params = {**params, "changed_id": changed[0]}
        await self._conn.execute(follow_up, params)
        return (await self._conn.execute(reading, params)).first()


@lru_cache(maxsize=128)
def _three_statements(
    change: Update | Insert, follow: FollowUp, read_back: ReadBack
) -> tuple[Statement, Statement, Statement]:
    """SQLite: the change returning its row's id, then the follow-up and read-back of that row."""
    table: Table = change.table  # type: ignore[assignment]
    changed = sql_select(*table.c).where(table.c.id == bindparam("changed_id")).subquery("changed")
    return change.returning(table.c.id), follow(changed), read_back(changed)


class Database:
    """The engine and its pool; a tool call opens one connection through it (`connect`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
        dialect = engine.dialect
        self._plan = lru_cache(maxsize=PLAN_CACHE_SIZE)(lambda statement: _compile(statement, dialect))

    @asynccontextmanager
    async def connect(self, *, write: bool, single_statement: bool = False) -> AsyncIterator[Conn]:
        """One call's connection. A writing connection is one transaction, committed when the block
        ends and rolled back when it raises, unless it is for a single statement (see `Conn`).

        Writers take turns, because each appends to the one audit chain. On SQLite a writing
        transaction takes the write lock at BEGIN (BEGIN IMMEDIATE), so two writers queue on the
        busy timeout instead of failing when a reader upgrades to a writer. On PostgreSQL it takes
        the chain's advisory lock before any row lock, so writers never deadlock over the chain.
        Reads run outside a transaction on PostgreSQL: under READ COMMITTED each statement reads
        its own snapshot either way, and a read then costs one round trip instead of three.
        """
        if self.is_sqlite:
            async with self._sqlite(write=write) as conn:
                yield _SqliteConn(conn, single_statement=write and single_statement)
            return
        fairy = await self.engine.raw_connection()
        driver: Any = fairy.driver_connection
        try:
            if write and not single_statement:
                # One round trip for both: the simple query protocol takes several statements.
                begin = f"BEGIN; SELECT pg_advisory_xact_lock({chain.CHAIN_LOCK_KEY})"
                _sent(begin, ())
                await driver.execute(begin)
                yield _PostgresConn(driver, self._plan, single_statement=False)
                _sent("COMMIT", ())
                await driver.execute("COMMIT")
            else:
                yield _PostgresConn(driver, self._plan, single_statement=write)
        except BaseException as exc:
            await _give_back_after(fairy, exc)
            raise
        fairy.close()

    @asynccontextmanager
    async def _sqlite(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            if write:
                conn = await conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")
            async with conn.begin():
                yield conn

    @asynccontextmanager
    async def session(self, *, write: bool) -> AsyncIterator[AsyncSession]:
        """An ORM session in one transaction, for scripts and tests that work with the models."""
        async with self._sessions() as session, session.begin():
            if write and self.is_sqlite:
                await session.connection(execution_options={"sqlite_begin": "BEGIN IMMEDIATE"})
            elif write:
                await session.exec(select(sql_func.pg_advisory_xact_lock(chain.CHAIN_LOCK_KEY)))
            yield session

    @property
    def where(self) -> str:
        """The database's URL with its password masked, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    async def open_schema(self, *, upgrade: bool) -> schema.Version:
        """The database's schema version, checked against this server's: brought up to it with
        `upgrade`, and otherwise a StartupError that says how when it is behind. What it was."""
        try:
            async with self.engine.connect() as conn:
                if upgrade and self.is_sqlite:
                    # Take the write lock before reading the version: two servers starting on
                    # one file then upgrade it one after the other, not both.
                    conn = await conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")
                async with conn.begin():
                    version = await conn.run_sync(schema.upgrade if upgrade else schema.version)
        except schema.SchemaError as exc:
            raise StartupError(f"the database {self.where} was {exc}; {exc.remedy}") from exc
        except (SQLAlchemyError, OSError) as exc:
            reason = exc.orig if isinstance(exc, DBAPIError) else exc
            raise StartupError(f"cannot open the database {self.where}: {reason}") from exc
        if version.behind and not upgrade:
            raise StartupError(
                f"the database {self.where} is at schema version {version.current or 'none (it is empty)'} "
                f"and this server needs {version.head}: {schema.MIGRATE} to upgrade it"
            )
        if version.behind:
            logger.info("upgraded the database schema from %s to %s", version.current or "none", version.head)
        return version

    async def dispose(self) -> None:
        await self.engine.dispose()


async def _give_back_after(fairy: PoolProxiedConnection, exc: BaseException) -> None:
    """Return a connection to the pool after `exc` ended its call: rolled back, or, when it may be
    broken or mid-statement (cancelled), closed and replaced."""
    driver = fairy.driver_connection
    if isinstance(exc, Exception) and not is_disconnect(exc) and driver is not None:
        try:
            if driver.is_in_transaction():
                _sent("ROLLBACK", ())
                await driver.execute("ROLLBACK")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            fairy.invalidate()
    else:
        fairy.invalidate()
    fairy.close()


def create_database(settings: Settings) -> Database:
    url = make_url(settings.async_database_url)
    kwargs: dict[str, Any] = {
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
        # Audit values are JSON; pydantic's parser reads them several times faster than json.loads.
        "json_deserializer": from_json,
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
    # Looked up at call time: OpenTelemetry's SQLAlchemy instrumentation wraps it (telemetry.py).
    engine = sqlalchemy.ext.asyncio.create_async_engine(url, **kwargs)
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
        f"REVOKE ALL ON entity, audit_entry, idempotency_key, alembic_version FROM {quote(role)}",
        f"GRANT SELECT, INSERT, UPDATE ON entity TO {quote(role)}",
        f"GRANT SELECT, INSERT ON audit_entry TO {quote(role)}",
        f"GRANT SELECT, INSERT, DELETE ON idempotency_key TO {quote(role)}",
        f"GRANT USAGE ON SEQUENCE entity_id_seq, audit_entry_id_seq TO {quote(role)}",
        # The server reads the schema version at start; only `migrate`, as the owner, changes it.
        f"GRANT SELECT ON alembic_version TO {quote(role)}",
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
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
        dbapi_connection.create_function(
            "audit_entry_hash", len(chain.CONTENT) + 1, chain.sqlite_entry_hash, deterministic=True
        )

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def on_execute(_conn: Connection, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        _sent(statement, parameters)


def _switch_to_wal(cursor: Any) -> None:
    """WAL mode, which the file keeps once set. Setting it on a new file needs a lock that another
    process starting on the same file may hold, and SQLite reports that at once rather than wait
    (the busy timeout does not apply), so wait here."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        await_only(asyncio.sleep(0.01))


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


class iso_text(FunctionElement[str]):
    """A time column as text, RFC 3339 in UTC with microseconds (2026-08-02T16:46:40.000000Z),
    written by the database: the same text schemas.iso_time writes, at no cost to the server."""

    type = String()
    inherit_cache = True


@compiles(iso_text, "postgresql")
def _iso_text_pg(element: iso_text, compiler: SQLCompiler, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


@compiles(iso_text, "sqlite")
def _iso_text_sqlite(element: iso_text, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite holds a time as the text 2026-08-02 16:46:40.000000, in UTC (models.UTCDateTime).
    column = compiler.process(element.clauses, **kw)
    return f"(substr({column}, 1, 10) || 'T' || substr({column}, 12) || 'Z')"


class ValueList(TypeDecorator[list[Any]]):
    """A list of values of `item_type` bound as one parameter: an array on PostgreSQL, JSON on SQLite."""

    impl = JSON
    cache_ok = True

    def __init__(self, item_type: TypeEngine[Any]) -> None:
        super().__init__()
        self.item_type = item_type

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(ARRAY(self.item_type))  # converts each item itself
        return dialect.type_descriptor(JSON())

    def process_bind_param(self, value: list[Any] | None, dialect: Dialect) -> list[Any] | None:
        if value is None or dialect.name == "postgresql":
            return value
        convert = self.item_type.dialect_impl(dialect).bind_processor(dialect)
        return value if convert is None else [convert(item) for item in value]


class one_of(ColumnElement[bool]):
    """`column` equals one of the values of the list bound as `name`.

    The list is one parameter whatever its length, so the statement's SQL never changes with it:
    `= ANY($1)` on PostgreSQL, `IN (SELECT value FROM json_each(?))` on SQLite.
    """

    type = Boolean()
    inherit_cache = True
    _is_implicitly_boolean = True  # a comparison: SQLite needs no `= 1` after it
    _traverse_internals = [  # noqa: RUF012  -- SQLAlchemy's declaration of what a cache key covers
        ("column", InternalTraversal.dp_clauseelement),
        ("values", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: ColumnElement[Any], name: str) -> None:
        self.column = column
        self.values = bindparam(name, type_=ValueList(column.type))


@compiles(one_of, "postgresql")
def _one_of_pg(element: one_of, compiler: SQLCompiler, **kw: Any) -> str:
    return f"{compiler.process(element.column, **kw)} = ANY({compiler.process(element.values, **kw)})"


@compiles(one_of, "sqlite")
def _one_of_sqlite(element: one_of, compiler: SQLCompiler, **kw: Any) -> str:
    column, values = compiler.process(element.column, **kw), compiler.process(element.values, **kw)
    return f"{column} IN (SELECT value FROM json_each({values}))"  # noqa: S608  -- compiled SQL, no values
