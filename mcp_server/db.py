"""Engine, sessions and transactions; everything that differs between SQLite and PostgreSQL.

A tool call opens one `AsyncSession` (SQLModel's) through `Database.session`: one transaction,
committed when the call's block ends and rolled back when it raises. The data functions run
their statements through that session and never commit. SQLAlchemy compiles each statement
once and caches it, converts values by their column types, and on PostgreSQL asyncpg keeps
each statement prepared on its connection.

Soft-deleted tasks and projects are left out of every ORM query for tasks or projects by
default (`with_loader_criteria` from a `do_orm_execute` hook, SQLAlchemy's recipe); a
statement executed with `INCLUDE_DELETED` sees them. What a row points at (a task's project,
an audit entry's entity) is always loaded, deleted or not.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import anyio
import sqlalchemy.ext.asyncio
from pydantic_core import from_json
from sqlalchemy import FromClause, Insert, Result, RowMapping, Table, Update, bindparam, event
from sqlalchemy import select as sql_select  # of a table's plain columns
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import ORMExecuteState, aliased, with_loader_criteria
from sqlalchemy.orm.interfaces import ORMOption
from sqlalchemy.sql import Executable
from sqlalchemy.util import await_only
from sqlmodel import SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.orm.session import Session
from sqlmodel.sql.expression import SelectOfScalar

from mcp_server import chain, schema
from mcp_server.config import Settings
from mcp_server.errors import DATABASE_ERRORS, CommitUnknownError, StartupError, is_disconnect
from mcp_server.models import Project, Task

logger = logging.getLogger(__name__)
# Every statement sent to the database, at DEBUG: its SQL in the message, its values only in the
# record (`parameters`), never in the text of the log.
sql_log = logging.getLogger("mcp_server.sql")

SQLITE_BUSY_TIMEOUT_MS = 5000
# The longest a cancelled call's session waits to roll back and return its connection; past it
# the connection is left to the pool, which discards it.
CLEANUP_SECONDS = 5
APPLICATION_NAME = "mcp-task-server"

# Execution options of a statement that must see soft-deleted tasks and projects too.
INCLUDE_DELETED = {"include_deleted": True}
# Of an ORM-enabled INSERT whose values are bound to it: one statement, not a bulk INSERT of rows.
RAW = {"dml_strategy": "raw"}
_LIVE_ONLY = (
    with_loader_criteria(Task, col(Task.deleted_at).is_(None)),
    with_loader_criteria(Project, col(Project.deleted_at).is_(None)),
)


class TaskSession(Session):
    """The ORM session behind every AsyncSession this server opens; see the module docstring."""


@event.listens_for(TaskSession, "do_orm_execute")
def _leave_out_deleted(state: ORMExecuteState) -> None:
    if (
        state.is_select
        and not state.is_column_load
        and not state.is_relationship_load
        and not state.execution_options.get("include_deleted", False)
    ):
        state.statement = _live_only(state.statement)


@lru_cache(maxsize=1024)
def _live_only(statement: Executable) -> Executable:
    """`statement` with the soft-delete criteria, made once per statement: the data functions keep
    their statements, and a statement made anew per call would have its cache key computed anew
    per call too (about 0.1 ms). Statements are immutable, so one is kept by its identity."""
    return statement.options(*_LIVE_ONLY)


def named_rows(found: Any) -> Sequence[RowMapping]:
    """The rows of an executed select, each read by column name. (SQLModel types the rows of a
    select of several columns as tuples; SQLAlchemy's result maps them by name.)"""
    return cast(Result[Any], found).mappings().all()


E = TypeVar("E", bound=SQLModel)


@dataclass(frozen=True)
class OneChange(Generic[E]):
    """A change to one row, the row it makes follow (its audit entry), and the changed row loaded
    as an entity: on PostgreSQL one statement of data-modifying CTEs, so one round trip does all;
    on SQLite, which has no data-modifying CTE, three statements, as safe there since a writer holds
    the file's write lock for its whole transaction, and an embedded database has no round trips."""

    combined: SelectOfScalar[E]  # PostgreSQL
    change: Insert | Update  # SQLite: the change, returning the row's id
    follow_up: Insert  # SQLite: the follow-up of the row named by changed_id
    read_back: SelectOfScalar[E]  # SQLite: the row named by changed_id


def one_change(
    entity: type[E],
    change: Insert | Update,
    follow: Callable[[FromClause], Insert],
    loading: Callable[[Any], ORMOption],
) -> OneChange[E]:
    """The statements of `change` (to one row of `entity`'s table) and `follow(changed row)`, the
    changed row loaded as `entity` with the option `loading(entity or its alias)`."""
    table = cast(Table, change.table)
    changed = change.returning(*table.c).cte("changed")
    loaded = aliased(entity, changed)
    follow_up = follow(changed).cte("follow_up")
    by_id = sql_select(*table.c).where(table.c.id == bindparam("changed_id")).subquery("changed")
    return OneChange(
        combined=select(loaded).options(loading(loaded)).add_cte(follow_up),
        change=change.returning(table.c.id),
        follow_up=follow(by_id),
        read_back=select(entity).options(loading(entity)).where(table.c.id == bindparam("changed_id")),
    )


async def run_one_change(session: AsyncSession, statements: OneChange[E], params: dict[str, Any]) -> E | None:
    """Run a `one_change`: the changed row as an entity, or None when the change matched nothing. The
    statements say themselves which rows they may change, deleted or not, and the row loaded
    replaces any copy the session holds."""
    loading = INCLUDE_DELETED | {"populate_existing": True}
    if session.get_bind().dialect.name == "postgresql":
        return (await session.exec(statements.combined, params=params, execution_options=loading)).first()
    # An INSERT with its values bound is one statement (RAW); an UPDATE's row is read back anyway.
    changing = RAW if isinstance(statements.change, Insert) else {"synchronize_session": False}
    changed_id = (await session.exec(statements.change, params=params, execution_options=changing)).scalar()
    if changed_id is None:
        return None
    params = params | {"changed_id": changed_id}
    await session.exec(statements.follow_up, params=params, execution_options=RAW)
    return (await session.exec(statements.read_back, params=params, execution_options=loading)).first()


class Database:
    """The engine, its pool, and the sessions a tool call opens (`session`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        options: dict[str, Any] = {
            "class_": AsyncSession,
            "sync_session_class": TaskSession,
            "expire_on_commit": False,
        }
        self._writes = async_sessionmaker(engine, **options)
        # On PostgreSQL a read needs no BEGIN and COMMIT around it: under READ COMMITTED each
        # statement reads its own snapshot either way, so in autocommit a read statement is one
        # round trip instead of three. A SQLite read keeps its transaction, a snapshot of the file.
        reads = engine if self.is_sqlite else engine.execution_options(isolation_level="AUTOCOMMIT")
        self._reads = async_sessionmaker(reads, **options)

    @asynccontextmanager
    async def session(self, *, write: bool) -> AsyncIterator[AsyncSession]:
        """One call's session in one transaction: committed when the block ends, rolled back when
        it raises or is cancelled.

        Cancellation: on PostgreSQL, asyncpg answers a cancelled wait with a cancel request, so
        the statement stops on the server; the rollback then runs shielded, on the way out. A
        commit runs shielded too: once begun it completes, so a call is either cancelled and
        rolled back or committed, never committed while reported cancelled. On SQLite a statement
        already running in the driver's thread runs to its end before the rollback.

        Writers share no lock: each audit row is stamped in its own transaction and sealed into
        the chain after it commits (chain.py). On SQLite a writing transaction takes the file's
        write lock at BEGIN (BEGIN IMMEDIATE), so two writers queue on the busy timeout instead
        of failing when a reader upgrades to a writer.
        """
        session = (self._writes if write else self._reads)()
        transaction = session.begin()
        try:
            await transaction
            if write and self.is_sqlite:
                await session.connection(execution_options={"sqlite_begin": "BEGIN IMMEDIATE"})
            yield session
        except BaseException:
            # Also when the call was cancelled: roll back on the way out, not in the pool's clean-up.
            with anyio.move_on_after(CLEANUP_SECONDS, shield=True):
                if transaction.is_active:
                    await transaction.rollback()
            raise
        else:
            # A commit that has begun completes, so its outcome is known: a cancellation that
            # arrives during it is too late, and the call stands.
            with anyio.CancelScope(shield=True):
                try:
                    await transaction.commit()
                except DATABASE_ERRORS as exc:
                    # The COMMIT went out and no answer came back: whether a write was applied
                    # is unknown here, and the caller must not be told it rolled back. (A read
                    # has nothing to apply: its error stands as it is.)
                    if write and is_disconnect(exc):
                        raise CommitUnknownError from exc
                    raise
        finally:
            with anyio.move_on_after(CLEANUP_SECONDS, shield=True):
                await session.close()

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
        kwargs["connect_args"] = {
            "server_settings": {
                "application_name": APPLICATION_NAME,  # how operators find its sessions in pg_stat_activity
                # Per statement, so a pathological filter or a held lock ends the call instead of hanging it.
                "statement_timeout": str(settings.statement_timeout_ms),
                "lock_timeout": str(settings.lock_timeout_ms),
                # While a statement runs, PostgreSQL checks every second that the server is still
                # connected, and cancels the statement when it is not: a server process that
                # exits (or is killed) mid-call leaves nothing running and no row locked.
                "client_connection_check_interval": str(settings.connection_check_interval_ms),
                # Between statements nothing runs to check: a server process frozen inside a call
                # (stopped, swapped out, stuck) would keep its transaction and every lock it took,
                # and all other writers of those rows would wait on it. Left idle this long, the
                # session is ended and its transaction rolled back.
                "idle_in_transaction_session_timeout": str(settings.idle_in_transaction_timeout_ms),
                # And a peer gone without a word (a host down, a cable pulled) is found by TCP
                # keepalives from the database's side: probes after this long idle, three at
                # a third of it apart.
                "tcp_keepalives_idle": str(settings.tcp_keepalive_seconds),
                "tcp_keepalives_interval": str(max(1, settings.tcp_keepalive_seconds // 3)),
                "tcp_keepalives_count": "3",
                # asyncpg keeps every statement prepared; after five runs PostgreSQL would switch to a
                # generic plan, blind to the values. The data is skewed (a thousand projects among a
                # million tasks in one table; a task's status varies with its age), and a generic
                # plan for a list of projects read the whole table (1.3 s instead of 1 ms). Each
                # run is planned for its values instead, as the statements peers send as text are.
                "plan_cache_mode": "force_custom_plan",
                # The cost of reading a page out of order, as on SSDs and cached data (the default
                # 4 assumes spinning disks): at 4, PostgreSQL walked the whole newest-first index and
                # discarded 23,000 rows rather than read 118 through (status, created_at, id).
                "random_page_cost": "1.1",
            }
        }
    # Looked up at call time: OpenTelemetry's SQLAlchemy instrumentation wraps it (telemetry.py).
    engine = sqlalchemy.ext.asyncio.create_async_engine(url, **kwargs)
    _log_statements(engine)
    if (path := _sqlite_path(url)) is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"cannot make the folder {path.parent} for the SQLite database ({exc.strerror}); "
                "set DATABASE_URL to a file in a folder this user can write"
            ) from None
    if url.get_backend_name() == "sqlite":
        _configure_sqlite(engine)
    return Database(engine)


def sqlite_file(settings: Settings) -> Path | None:
    """The file of the settings' SQLite database; None for PostgreSQL or an in-memory database."""
    return _sqlite_path(make_url(settings.async_database_url))


def _sqlite_path(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database).expanduser()


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
        f"REVOKE ALL ON entity, audit_entry, audit_seal, audit_chain, audit_checkpoint, idempotency_key, "
        f"oauth_client, oauth_grant, oauth_secret, operator_sign_in, task_dependency, task_comment, "
        f"write_budget, changeset, changeset_item, console_session, refusal_tally, lock_slot, "
        f"alembic_version FROM {quote(role)}",
        f"GRANT SELECT, INSERT, UPDATE ON entity TO {quote(role)}",
        f"GRANT SELECT, INSERT, DELETE ON task_dependency TO {quote(role)}",
        f"GRANT SELECT, INSERT ON task_comment TO {quote(role)}",
        f"GRANT SELECT, INSERT ON audit_entry, audit_seal, audit_checkpoint TO {quote(role)}",
        # The sealer moves the chain's head and holds its lease in this table's one row.
        f"GRANT SELECT, UPDATE ON audit_chain TO {quote(role)}",
        f"GRANT SELECT, INSERT, DELETE ON idempotency_key TO {quote(role)}",
        # The built-in authorization server: registrations, grants (revoked, never deleted) and
        # what it issued (marked used, and deleted once expired).
        f"GRANT SELECT, INSERT, DELETE ON oauth_client TO {quote(role)}",
        f"GRANT SELECT, INSERT, UPDATE ON oauth_grant TO {quote(role)}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON oauth_secret TO {quote(role)}",
        f"GRANT SELECT, INSERT, UPDATE ON operator_sign_in TO {quote(role)}",
        f"GRANT SELECT, INSERT, UPDATE ON write_budget TO {quote(role)}",
        # Changesets: decided (state), and deleted with their items once long expired.
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON changeset TO {quote(role)}",
        f"GRANT SELECT, INSERT, DELETE ON changeset_item TO {quote(role)}",
        # Console sign-ins: made, extended while used, deleted at sign-out or once expired.
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON console_session TO {quote(role)}",
        f"GRANT SELECT, INSERT, UPDATE ON refusal_tally TO {quote(role)}",
        # Writers that take turns lock a row here (locks.py); UPDATE is what SELECT ... FOR UPDATE needs.
        f"GRANT SELECT, UPDATE ON lock_slot TO {quote(role)}",
        f"GRANT USAGE ON SEQUENCE entity_id_seq, audit_entry_id_seq, oauth_grant_id_seq, task_comment_id_seq "
        f"TO {quote(role)}",
        # The server reads the schema version at start; only `migrate`, as the owner, changes it.
        f"GRANT SELECT ON alembic_version TO {quote(role)}",
    ):
        conn.exec_driver_sql(statement)


def _log_statements(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def on_execute(_conn: Connection, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if sql_log.isEnabledFor(logging.DEBUG):
            sql_log.debug("%s", statement, extra={"parameters": parameters})


def _configure_sqlite(engine: AsyncEngine) -> None:
    # pysqlite's own transaction handling issues BEGIN lazily and never BEGIN IMMEDIATE; switch it
    # off and issue BEGIN from SQLAlchemy's begin event (the recipe in SQLAlchemy's SQLite dialect
    # documentation), IMMEDIATE when the session asks for it.
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
        dbapi_connection.create_function(
            "audit_entry_hash", len(chain.LEGACY_CONTENT) + 1, chain.sqlite_entry_hash, deterministic=True
        )
        dbapi_connection.create_function(
            "audit_row_hash", len(chain.ROW_CONTENT), chain.sqlite_row_hash, deterministic=True
        )
        # The id of the transaction under way, which the audit trigger stamps on each row (see on_begin).
        transaction = record.info.setdefault("transaction", {"id": 0})
        dbapi_connection.create_function("audit_txid", 0, lambda: transaction["id"])

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))
        # SQLite has no transaction ids: a transaction is known by when it began, in nanoseconds,
        # made to increase within this process. Writers take turns, so no two overlap in time.
        conn.info.setdefault("transaction", {"id": 0})["id"] = _next_transaction_id()


_last_transaction_id = 0


def _next_transaction_id() -> int:
    global _last_transaction_id
    _last_transaction_id = max(time.time_ns(), _last_transaction_id + 1)
    return _last_transaction_id


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
