"""The database schema: its migrations (Alembic, in schema_versions/), the version a database is at,
and the upgrade to this server's version.

Each migration is written out in full, the first one included, so a database built by migrations
is the same whenever it is built; a test checks that the models and the migrations agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

FIRST = "0001"
# What to do about a database behind this server's version.
MIGRATE = "run `mcp-task-server migrate` with the same settings"
# Taken by an upgrade on PostgreSQL, so that servers starting together upgrade one at a time.
MIGRATION_LOCK_KEY = 7_243_017_110_399
# What a database made before migrations existed must have to count as the first migration's:
# the audit chain's columns came last, so without them it is older still.
_FIRST_RELEASE_COLUMNS = {"entity": {"version"}, "audit_entry": {"entry_hash", "prev_hash", "seq"}}


@dataclass(frozen=True)
class Version:
    current: str | None  # None: no schema at all
    head: str

    @property
    def behind(self) -> bool:
        return self.current != self.head


def _config(conn: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "mcp_server:schema_versions")
    if conn is not None:
        config.attributes["connection"] = conn
    return config


@lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    revision = _scripts().get_current_head()
    assert revision is not None, "schema_versions holds at least one migration"
    return revision


def version(conn: Connection) -> Version:
    """The version the database is at; a database made before migrations counts as the first
    migration's when it has that migration's tables, and raises OutdatedError when it is older."""
    return _version(conn, _recorded(conn))


def _recorded(conn: Connection) -> str | None:
    """The version Alembic recorded in the database, if any."""
    return MigrationContext.configure(conn).get_current_revision()


def _version(conn: Connection, recorded: str | None) -> Version:
    current = recorded
    if current is None and inspect(conn).has_table("entity"):
        _check_first_release(conn)
        current = FIRST
    if current is not None and current not in {script.revision for script in _scripts().walk_revisions()}:
        raise NewerError(f"its schema version {current} is not one this server knows")
    return Version(current, head())


def upgrade(conn: Connection, target: str = "head") -> Version:
    """Bring the database to this server's version (or an earlier `target`), in the caller's
    transaction; what it was."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"))
        # A migration rewrites whole tables: the server's statement_timeout, meant for tool calls,
        # would cancel it on a large database. lock_timeout stays, so a migration that cannot get
        # its locks fails instead of queueing every server's queries behind it.
        conn.execute(text("SET LOCAL statement_timeout = 0"))
    recorded = _recorded(conn)
    before = _version(conn, recorded)
    if before.current is not None and recorded is None:
        command.stamp(_config(conn), FIRST)  # a database from before migrations: record what it is
    if before.behind:
        command.upgrade(_config(conn), target)
    return before


class SchemaError(Exception):
    """A schema this server cannot upgrade: the message says what it is, `remedy` what to do."""

    remedy: str
    what: str

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.what} ({detail})")


class OutdatedError(SchemaError):
    """The database predates every migration this server has."""

    what = "made by a version older than any migration"
    remedy = "start from a new database"


class NewerError(SchemaError):
    """The database was migrated by a newer server than this one."""

    what = "upgraded by a newer mcp-task-server"
    remedy = "run that version, or upgrade this one"


def _check_first_release(conn: Connection) -> None:
    inspector = inspect(conn)
    for table, needed in _FIRST_RELEASE_COLUMNS.items():
        present = set()
        if inspector.has_table(table):
            present = {column["name"] for column in inspector.get_columns(table)}
        if missing := sorted(needed - present):
            raise OutdatedError(f"it lacks {', '.join(f'{table}.{name}' for name in missing)}")
