"""The tables.

Projects and tasks live in one `entity` table behind the `kind` discriminator and are loaded as
their own classes (`Project`, `Task`) through SQLAlchemy single-table inheritance. One id space
means an audit entry points at any entity through a real foreign key, and an agent can name any
entity by its id alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    inspect,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeMeta, Mapped, foreign, relationship, remote
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, Relationship, SQLModel


class TaskStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    BLOCKED = "blocked"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class Priority(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class EntityKind(StrEnum):
    PROJECT = "project"
    TASK = "task"


class AuditAction(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    RESTORED = "restored"
    REFUSED = "refused"  # a call the agent had no permission for; nothing changed
    AUTHORIZED = "authorized"  # an operator let an OAuth client act as an agent (oauth.py)
    CLAIMED = "claimed"  # an agent took a lease on a task (claims.py)
    RENEWED = "renewed"  # the holder extended its lease
    RELEASED = "released"  # the holder gave the task up before its lease ran out
    COMMENTED = "commented"  # an agent left a comment on a task (comments.py)
    SIGNED_IN = "signed_in"  # an operator signed in to the console (console/)
    SIGNED_OUT = "signed_out"  # and signed out
    HELD = "held"  # a change waits for a person's approval as a changeset (changesets.py)
    APPROVED = "approved"  # an operator approved a changeset; its changes share the entry's request
    REJECTED = "rejected"  # an operator rejected a changeset; it never applies


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on both databases (SQLite stores no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where a timezone-aware one is required")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        if dialect.driver == "asyncpg":  # asyncpg reads timestamptz as an aware UTC datetime already
            return None
        return super().result_processor(dialect, coltype)


PRIORITY_RANK: dict[Priority, int] = {p: rank for rank, p in enumerate(Priority, start=1)}
PRIORITY_NAME: dict[int, str] = {rank: p.value for p, rank in PRIORITY_RANK.items()}
_PRIORITY_BY_RANK = {rank: p for p, rank in PRIORITY_RANK.items()}


# Ids are 64-bit on PostgreSQL: the audit log only grows, and a 32-bit id runs out at 2.1 billion
# rows. On SQLite an INTEGER PRIMARY KEY is the 64-bit rowid already, and must be spelled INTEGER.
IdType = BigInteger().with_variant(Integer(), "sqlite")


class PriorityType(TypeDecorator[Priority]):
    """Stored as its rank, so ordering by priority is ordering by urgency and can use an index."""

    impl = SmallInteger
    cache_ok = True

    def process_bind_param(self, value: Priority | str | None, dialect: Dialect) -> int | None:
        return None if value is None else PRIORITY_RANK[Priority(value)]

    def process_result_value(self, value: int | None, dialect: Dialect) -> Priority | None:
        return None if value is None else _PRIORITY_BY_RANK[value]


JSONValue = JSON().with_variant(JSONB(), "postgresql")

_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in TaskStatus)
_LIVE_PROJECT = "kind = 'project' AND deleted_at IS NULL"


_VERSION = Column("version", Integer, nullable=False, server_default=text("1"))
# No Python-side default: rows written without it (by older servers too) get the database's 0.
_FENCING_TOKEN = Column("fencing_token", BigInteger, nullable=False, server_default=text("0"))


class Entity(SQLModel, table=True):
    __tablename__ = "entity"
    __table_args__ = (
        CheckConstraint("kind IN ('project', 'task')", name="ck_entity_kind"),
        CheckConstraint(f"status IS NULL OR status IN ({_STATUS_VALUES})", name="ck_entity_status"),
        CheckConstraint(
            "kind <> 'task' OR (status IS NOT NULL AND priority IS NOT NULL AND project_id IS NOT NULL)",
            name="ck_entity_task_fields",
        ),
        # The orderings search_tasks offers, each ending in id so keyset paging is exact, and the
        # equalities agents filter on most, in the default order (newest first): status, status
        # with priority, a project.
        Index("ix_entity_kind_created", "kind", "created_at", "id"),
        Index("ix_entity_kind_updated", "kind", "updated_at", "id"),
        Index("ix_entity_kind_priority", "kind", "priority", "id"),
        Index("ix_entity_status_created", "status", "created_at", "id"),
        Index("ix_entity_status_priority_created", "status", "priority", "created_at", "id"),
        Index("ix_entity_project_created", "project_id", "created_at", "id"),
        Index("ix_entity_title", "title"),
        # Who holds what: the tasks an agent holds a claim on (claims.py), and when each ends.
        Index(
            "ix_entity_claimed_by",
            "claimed_by",
            "claim_expires_at",
            sqlite_where=text("claimed_by IS NOT NULL"),
            postgresql_where=text("claimed_by IS NOT NULL"),
        ),
        # A project name is unique among live projects only, so a deleted project's name is reusable.
        Index(
            "uq_entity_live_project_title",
            "title",
            unique=True,
            sqlite_where=text(_LIVE_PROJECT),
            postgresql_where=text(_LIVE_PROJECT),
        ),
        # Live projects by their name's key (titles.name_key): names that read the same are refused.
        Index(
            "ix_entity_project_name_key",
            "title_key",
            sqlite_where=text(_LIVE_PROJECT),
            postgresql_where=text(_LIVE_PROJECT),
        ),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=IdType)
    # Set from the subclass's polymorphic identity; the default only keeps the constructor optional.
    kind: str = Field(default="", sa_type=String(16), nullable=False)
    title: str = Field(sa_type=String(200), nullable=False)
    description: str = Field(default="", sa_type=Text, nullable=False)
    status: TaskStatus | None = Field(default=None, sa_type=String(16))
    priority: Priority | None = Field(default=None, sa_type=PriorityType)
    project_id: int | None = Field(default=None, foreign_key="entity.id", sa_type=IdType)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # Counts the changes to the row. The ORM keeps it (version_id_col): every flush of a change
    # sets it one higher WHERE it still has the value read, so a change made meanwhile by anyone
    # is a StaleDataError instead of a lost update; an agent may name the version it read, too.
    version: int = Field(default=1, sa_column=_VERSION)
    # A task's claim (claims.py): who holds it and until when, live only before claim_expires_at,
    # so an expired lease frees the task with no job to clear it. The fencing token grows with
    # every claim of the task; a holder's write names it, so a holder whose lease lapsed and was
    # taken by another cannot overwrite the new holder's work.
    claimed_by: str | None = Field(default=None, sa_type=String(200))
    claim_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    fencing_token: int = Field(default=0, sa_column=_FENCING_TOKEN)
    # A task's title as the duplicate guard compares it (titles.key): a create is refused when a live
    # task in the same project has the same key. A project's name by its skeleton (titles.name_key):
    # no two live projects' names may read the same.
    title_key: str | None = Field(default=None, sa_type=String(32))

    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_on": "kind", "version_id_col": _VERSION}


_E = TypeVar("_E", bound=type[Entity])


def _single_table_subclass(identity: EntityKind) -> Any:
    """Map an `Entity` subclass into the same table under its discriminator value.

    SQLModel maps only the first table class in a hierarchy, so the subclass is mapped here:
    the per-field Columns SQLModel made for it are dropped (the parent's table already has
    them), the parent's pydantic field defaults are restored over the instrumented attributes
    that pydantic picked up as defaults, and `kind` defaults to the subclass's identity.
    """

    def apply(cls: _E) -> _E:
        namespace = {k: v for k, v in cls.__dict__.items() if not isinstance(v, Column)}
        for name, value in list(cls.__dict__.items()):
            if isinstance(value, Column):
                delattr(cls, name)
        cls.__mapper_args__ = namespace["__mapper_args__"] = {"polymorphic_identity": identity.value}
        DeclarativeMeta.__init__(cls, cls.__name__, cls.__bases__, namespace)
        for name, field in Entity.model_fields.items():
            cls.__pydantic_fields__[name] = copy.copy(field)
        cls.__pydantic_fields__["kind"].default = identity.value
        cls.model_rebuild(force=True)
        return cls

    return apply


@_single_table_subclass(EntityKind.PROJECT)
class Project(Entity, table=True):
    __tablename__ = None  # type: ignore[assignment]


@_single_table_subclass(EntityKind.TASK)
class Task(Entity, table=True):
    __tablename__ = None  # type: ignore[assignment]

    project: ClassVar[Mapped[Project]]  # mapped below; the subclass mapping cannot declare it


# Lazy loading would do I/O on attribute access, which async code cannot do: every relationship
# raises instead, so a read that forgot to eager-load what it shows fails its test. The target is
# Entity, not Project: a task's project_id only ever names a project (the row loads as a Project
# all the same), and Project's `kind = 'project'` criterion on the join made PostgreSQL misjudge
# the join as tiny, then scan and sort every task instead of walking the ordering index.
ENTITY_TABLE: Table = Entity.__table__  # type: ignore[attr-defined]  # SQLModel does not declare it
inspect(Task).add_property(
    "project",
    relationship(
        Entity,
        primaryjoin=foreign(ENTITY_TABLE.c.project_id) == remote(ENTITY_TABLE.c.id),
        lazy="raise",
    ),
)


# The ready queue (claims.py): tasks that may be claimed, in the order claim_task takes them by
# default (most urgent, then oldest), so taking the next one reads from the front of the index
# instead of sorting every pending task. The claimable statuses are claims.CLAIMABLE_STATUSES.
QUEUE_WHERE = "kind = 'task' AND deleted_at IS NULL AND status IN ('pending', 'in_progress')"
Index(
    "ix_entity_queue",
    ENTITY_TABLE.c.priority.desc(),
    ENTITY_TABLE.c.created_at,
    ENTITY_TABLE.c.id,
    postgresql_where=text(QUEUE_WHERE),
    sqlite_where=text(QUEUE_WHERE),
)

# The duplicate guard (tasks.create_task): a live task of a project by its title's key. The
# predicate names title_key, so that no query but the guard's (whose `title_key = ...` implies it)
# can use the index: without it, on a young database whose statistics said "few tasks", the
# planner took this index for a cheap list of all live tasks and looped over it.
TITLE_KEY_WHERE = "kind = 'task' AND deleted_at IS NULL AND title_key IS NOT NULL"
Index(
    "ix_entity_title_key",
    ENTITY_TABLE.c.project_id,
    ENTITY_TABLE.c.title_key,
    postgresql_where=text(TITLE_KEY_WHERE),
    sqlite_where=text(TITLE_KEY_WHERE),
)

# The agent holding a live claim on a task, in SQL: none once the lease has run out, whatever the
# row still says. A statement that uses it binds the time to judge by as CLAIMS_NOW.
CLAIMS_NOW = "claims_now"
LIVE_HOLDER: Any = case(
    (
        ENTITY_TABLE.c.claim_expires_at > bindparam(CLAIMS_NOW, type_=UTCDateTime()),
        ENTITY_TABLE.c.claimed_by,
    ),
    else_=None,
)


class TaskDependency(SQLModel, table=True):
    """An edge of the dependency graph: `task_id` waits for `blocked_by` (dependencies.py). A
    blocker holds its task back while it is live and not finished."""

    __tablename__ = "task_dependency"
    __table_args__ = (
        CheckConstraint("task_id <> blocked_by", name="ck_task_dependency_not_itself"),
        Index("ix_task_dependency_blocked_by", "blocked_by", "task_id"),
    )

    task_id: int = Field(primary_key=True, foreign_key="entity.id", sa_type=IdType)
    blocked_by: int = Field(primary_key=True, foreign_key="entity.id", sa_type=IdType)
    created_at: datetime = Field(sa_type=UTCDateTime, nullable=False)


class TaskComment(SQLModel, table=True):
    """A comment on a task, by the agent that wrote it (comments.py). Append-only: triggers
    refuse every UPDATE and DELETE, as they do for the audit log."""

    __tablename__ = "task_comment"
    __table_args__ = (Index("ix_task_comment_task", "task_id", "id"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=IdType)
    task_id: int = Field(foreign_key="entity.id", sa_type=IdType, nullable=False)
    author: str = Field(sa_type=String(200), nullable=False)
    body: str = Field(sa_type=Text, nullable=False)
    created_at: datetime = Field(sa_type=UTCDateTime, nullable=False)


class AuditEntry(SQLModel, table=True):
    """One change (or one refused call). Append-only; sealed into a hash chain after it commits.

    On insert a trigger stamps `txid` (the writing transaction) and `row_hash` (its content's
    hash), whatever the application passes; the sealer later gives it a position in `AuditSeal`
    (see chain.py). `seq`, `prev_hash` and `entry_hash` hold the seal of entries written before
    schema version 0005, which sealed each entry as it was inserted. Triggers refuse every UPDATE
    and DELETE of a stamped entry.
    """

    __tablename__ = "audit_entry"
    __table_args__ = (
        Index("ix_audit_entity_changed", "entity_id", "changed_at", "id"),
        Index("ix_audit_changed_by_changed", "changed_by", "changed_at"),
        Index("ix_audit_request", "request_id"),
        Index("ix_audit_changed", "changed_at", "id"),
        Index("uq_audit_seq", "seq", unique=True),
        # The latest refusals (the console's agents page), few among millions of entries.
        Index(
            "ix_audit_refused",
            "changed_at",
            "id",
            postgresql_where=text("action = 'refused'"),
            sqlite_where=text("action = 'refused'"),
        ),
        Index(
            "ix_audit_txid",
            "txid",
            "id",
            postgresql_where=text("txid IS NOT NULL"),
            sqlite_where=text("txid IS NOT NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=IdType)
    seq: int | None = Field(default=None, sa_type=BigInteger)
    entity_id: int | None = Field(default=None, foreign_key="entity.id", sa_type=IdType)
    entity_type: str | None = Field(default=None, sa_type=String(16))
    action: AuditAction = Field(sa_type=String(16), nullable=False)
    changed_by: str = Field(sa_type=String(200), nullable=False)
    client_name: str | None = Field(default=None, sa_type=String(200))
    changed_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    request_id: str = Field(sa_type=String(64), nullable=False)
    old_value: dict[str, Any] | None = Field(default=None, sa_type=JSONValue)
    new_value: dict[str, Any] | None = Field(default=None, sa_type=JSONValue)
    prev_hash: str | None = Field(default=None, sa_type=String(64))
    entry_hash: str | None = Field(default=None, sa_type=String(64))
    txid: int | None = Field(default=None, sa_type=BigInteger)
    row_hash: str | None = Field(default=None, sa_type=String(64))

    # The task or project it is about, loaded as its own class; none for a refused call.
    entity: Entity | None = Relationship(sa_relationship=relationship(Entity, lazy="raise"))


class AuditSeal(SQLModel, table=True):
    """An audit entry's place in the chain, given by the sealer after the entry committed:
    `entry_hash` = chain.link_hash(prev_hash, seq, entry_id, the entry's row_hash). Append-only."""

    __tablename__ = "audit_seal"
    __table_args__ = (UniqueConstraint("entry_id", name="uq_audit_seal_entry"),)

    seq: int = Field(primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False})
    entry_id: int = Field(foreign_key="audit_entry.id", sa_type=IdType, nullable=False)
    prev_hash: str = Field(sa_type=String(64), nullable=False)
    entry_hash: str = Field(sa_type=String(64), nullable=False)
    sealed_at: datetime = Field(sa_type=UTCDateTime, nullable=False)


class AuditChain(SQLModel, table=True):
    """The chain's one row: its head, the sealer's horizon, and which sealer holds the lease.

    The horizon: every entry below it is sealed; on PostgreSQL a transaction id (entries are
    stamped with their writer's), on SQLite an entry id (one writer at a time, so ids commit in
    order)."""

    __tablename__ = "audit_chain"
    __table_args__ = (CheckConstraint("id = 1", name="ck_audit_chain_one_row"),)

    id: int = Field(primary_key=True, sa_type=SmallInteger, sa_column_kwargs={"autoincrement": False})
    head_seq: int = Field(sa_type=BigInteger, nullable=False)
    head_hash: str = Field(sa_type=String(64), nullable=False)
    horizon: int = Field(sa_type=BigInteger, nullable=False)
    sealer: str | None = Field(default=None, sa_type=String(200))
    lease_until: datetime | None = Field(default=None, sa_type=UTCDateTime)


class AuditCheckpoint(SQLModel, table=True):
    """A signed statement of the chain's head at `seq`, written by the sealer. Append-only."""

    __tablename__ = "audit_checkpoint"

    seq: int = Field(primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False})
    head_hash: str = Field(sa_type=String(64), nullable=False)
    signed_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    key_id: str = Field(sa_type=String(64), nullable=False)
    signature: str = Field(sa_type=String(200), nullable=False)


class WriteBudgetUse(SQLModel, table=True):
    """What an agent has written in its current budget window (budgets.py): one row per agent,
    started over when a new window begins, shared by every server process on the database."""

    __tablename__ = "write_budget"

    agent_id: str = Field(sa_type=String(200), primary_key=True)
    window_start: datetime = Field(sa_type=UTCDateTime, nullable=False)
    calls_used: int = Field(nullable=False)
    rows_used: int = Field(sa_type=BigInteger, nullable=False)


class ChangesetState(StrEnum):
    PROPOSED = "proposed"  # a preview's changeset: its agent may apply it (apply_changeset)
    PENDING = "pending"  # held for a person's approval
    APPLIED = "applied"
    REJECTED = "rejected"


class Changeset(SQLModel, table=True):
    """A change bound to what it changes (changesets.py): the tasks, each at the version it was
    read at with its before and after (`ChangesetItem`), and the SHA-256 of all of it."""

    __tablename__ = "changeset"
    __table_args__ = (Index("ix_changeset_state_created", "state", "created_at"),)

    id: str = Field(primary_key=True, sa_type=String(32))
    created_by: str = Field(sa_type=String(200), nullable=False)
    tool: str = Field(sa_type=String(40), nullable=False)
    # What it does: {"op": "status", "status": ...}, {"op": "delete"} or {"op": "update", "changes": ...}.
    operation: dict[str, Any] = Field(sa_type=JSONValue, nullable=False)
    summary: str = Field(sa_type=String(300), nullable=False)
    task_count: int = Field(nullable=False)
    digest: str = Field(sa_type=String(64), nullable=False)
    state: ChangesetState = Field(sa_type=String(16), nullable=False)
    created_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    decided_by: str | None = Field(default=None, sa_type=String(200))
    decided_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # The request whose audit entries are its changes, once applied.
    applied_request_id: str | None = Field(default=None, sa_type=String(64))
    # What its agent was allowed when it proposed it: an approved change is applied within them.
    permissions: dict[str, Any] = Field(sa_type=JSONValue, nullable=False)


class ChangesetItem(SQLModel, table=True):
    """One task of a changeset: the version it must still have, and its values before and after.

    No foreign keys: items are written only by an INSERT ... SELECT from `entity`, in the
    transaction that writes their changeset, tasks are never deleted (the application role may
    not), and the changeset's digest covers its items. A key check per item made the preview of
    a 100,000-task change seven times slower on PostgreSQL (4.2 s against 0.57 s)."""

    __tablename__ = "changeset_item"

    changeset_id: str = Field(primary_key=True, sa_type=String(32))
    task_id: int = Field(primary_key=True, sa_type=IdType)
    version: int = Field(nullable=False)
    before: dict[str, Any] = Field(sa_type=JSONValue, nullable=False)
    after: dict[str, Any] = Field(sa_type=JSONValue, nullable=False)


class RefusalTally(SQLModel, table=True):
    """Refusals of one agent, tool and missing permission in the current window (refusals.py): the
    first is an audit entry, the rest are counted here, and the next window's entry carries the
    count. One row per key, shared by every server process."""

    __tablename__ = "refusal_tally"

    agent_id: str = Field(primary_key=True, sa_type=String(200))
    tool: str = Field(primary_key=True, sa_type=String(100))
    permission: str = Field(primary_key=True, sa_type=String(200))
    window_start: datetime = Field(sa_type=UTCDateTime, nullable=False)
    repeats: int = Field(sa_type=BigInteger, nullable=False)


class LockSlot(SQLModel, table=True):
    """A row to lock (locks.py): PostgreSQL writers that must take turns lock one of these, which
    only a role granted UPDATE here can do, rather than an advisory lock any role that can connect
    could take and hold. A fixed set of rows, made by the migration."""

    __tablename__ = "lock_slot"

    space: int = Field(primary_key=True, sa_type=SmallInteger)
    slot: int = Field(primary_key=True, sa_type=Integer)


class ConsoleSession(SQLModel, table=True):
    """An operator signed in to the console: the SHA-256 of the cookie's secret (never the secret),
    the form token every change must carry, and until when it lasts unless used again."""

    __tablename__ = "console_session"

    token_sha256: str = Field(primary_key=True, sa_type=String(64))
    operator_id: str = Field(sa_type=String(200), nullable=False)
    csrf_token: str = Field(sa_type=String(64), nullable=False)
    created_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)


class IdempotencyRecord(SQLModel, table=True):
    """The first result of a writing call made with an idempotency key, replayed to its retries."""

    __tablename__ = "idempotency_key"
    __table_args__ = (Index("ix_idempotency_expires", "expires_at"),)

    agent_id: str = Field(sa_type=String(200), primary_key=True)
    key: str = Field(sa_type=String(200), primary_key=True)
    tool: str = Field(sa_type=String(64), nullable=False)
    fingerprint: str = Field(sa_type=String(64), nullable=False)
    result: dict[str, Any] = Field(sa_type=JSONValue, nullable=False)
    created_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)


class OAuthClient(SQLModel, table=True):
    """An OAuth client registered with the built-in authorization server (RFC 7591).

    `info` is its registration as the SDK checked it. A confidential client's secret is in it:
    the SDK's token endpoint compares the secret it is sent with the stored one. A secret alone
    obtains nothing: a token needs a code or refresh token too, and those are stored as hashes."""

    __tablename__ = "oauth_client"
    __table_args__ = (Index("ix_oauth_client_registered", "registered_at"),)

    client_id: str = Field(primary_key=True, sa_type=String(64))
    info: dict[str, Any] = Field(sa_type=JSONValue, nullable=False)
    registered_at: datetime = Field(sa_type=UTCDateTime, nullable=False)


class OAuthGrant(SQLModel, table=True):
    """An operator's consent: client `client_id` acts as agent `agent_id`, read-only or with the
    agent's permissions, until revoked. Every token issued for it dies with it."""

    __tablename__ = "oauth_grant"
    __table_args__ = (Index("ix_oauth_grant_client", "client_id"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=IdType)
    client_id: str = Field(foreign_key="oauth_client.client_id", sa_type=String(64), nullable=False)
    agent_id: str = Field(sa_type=String(200), nullable=False)
    read_only: bool = Field(nullable=False)
    scopes: list[str] = Field(sa_type=JSONValue, nullable=False)
    resource: str | None = Field(default=None, sa_type=String(2000))
    granted_by: str = Field(sa_type=String(200), nullable=False)
    granted_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class OAuthSecretKind(StrEnum):
    REQUEST = "request"  # an authorization request waiting on the consent page
    CODE = "code"  # an authorization code, redeemed once
    ACCESS = "access"  # an access token
    REFRESH = "refresh"  # a refresh token, redeemed once (rotated)


class OAuthSecret(SQLModel, table=True):
    """Something the authorization server handed out, stored as the SHA-256 of its value only:
    a pending request, a code, an access or a refresh token. A request has no grant yet; `details`
    holds what the next step checks (the request's parameters, the code's PKCE challenge and
    redirect URI). `used_at` marks a code or refresh token redeemed, so a second use is seen as a
    replay (and revokes the grant) rather than as an unknown value."""

    __tablename__ = "oauth_secret"
    __table_args__ = (
        Index("ix_oauth_secret_grant", "grant_id"),
        Index("ix_oauth_secret_expires", "expires_at"),
    )

    value_sha256: str = Field(primary_key=True, sa_type=String(64))
    kind: OAuthSecretKind = Field(sa_type=String(16), nullable=False)
    client_id: str = Field(foreign_key="oauth_client.client_id", sa_type=String(64), nullable=False)
    grant_id: int | None = Field(default=None, foreign_key="oauth_grant.id", sa_type=IdType)
    details: dict[str, Any] = Field(sa_type=JSONValue, nullable=False)
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class OperatorSignIn(SQLModel, table=True):
    """An operator's recent failed sign-ins, shared by every server process: too many within a
    window lock the operator out for a while, however many requests or processes the guesses
    come through (oauth.py)."""

    __tablename__ = "operator_sign_in"

    operator_id: str = Field(primary_key=True, sa_type=String(200))
    failures: int = Field(sa_type=Integer, nullable=False)
    window_started_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    locked_until: datetime | None = Field(default=None, sa_type=UTCDateTime)


# The tables behind the models, for statements that select plain columns (SQLModel does not declare them).
AUDIT_TABLE: Table = AuditEntry.__table__  # type: ignore[attr-defined]
SEAL_TABLE: Table = AuditSeal.__table__  # type: ignore[attr-defined]
CHAIN_TABLE: Table = AuditChain.__table__  # type: ignore[attr-defined]
CHECKPOINT_TABLE: Table = AuditCheckpoint.__table__  # type: ignore[attr-defined]
