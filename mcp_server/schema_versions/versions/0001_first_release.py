# ruff: noqa: E501, S608  -- SQL text as the database stores it; built only from constants
"""The schema of the first release: tasks and projects, the audit log and its hash chain,
idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-30

Written out in full rather than from the models, so that it builds the same schema for as long as
it exists, whatever the models become.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_LIVE_PROJECT = "kind = 'project' AND deleted_at IS NULL"

# The audit chain: each insert sealed with the next position and a hash over the previous entry's
# hash and its own content; updates, deletes and truncation refused (see mcp_server/chain.py).
_CHAIN_POSTGRESQL = [
    """
CREATE OR REPLACE FUNCTION audit_entry_hash(e audit_entry) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT encode(sha256(convert_to(e.prev_hash || jsonb_build_array(
        e.seq, e.entity_id, e.entity_type, e.action, e.changed_by, e.client_name,
        e.changed_at AT TIME ZONE 'UTC', e.request_id, e.old_value, e.new_value)::text, 'UTF8')), 'hex')
$$""",
    """
CREATE OR REPLACE FUNCTION audit_entry_seal() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    head record;
BEGIN
    PERFORM pg_advisory_xact_lock(7243017110398);
    SELECT seq, entry_hash INTO head FROM audit_entry ORDER BY seq DESC LIMIT 1;
    NEW.seq := coalesce(head.seq, 0) + 1;
    NEW.prev_hash := coalesce(head.entry_hash, '0000000000000000000000000000000000000000000000000000000000000000');
    NEW.entry_hash := audit_entry_hash(NEW);
    RETURN NEW;
END $$""",
    """
CREATE OR REPLACE FUNCTION audit_entry_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_entry is append-only: %% refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END $$""",
    "CREATE TRIGGER audit_entry_seal BEFORE INSERT ON audit_entry FOR EACH ROW EXECUTE FUNCTION audit_entry_seal()",
    "CREATE TRIGGER audit_entry_append_only BEFORE UPDATE OR DELETE ON audit_entry "
    "FOR EACH ROW EXECUTE FUNCTION audit_entry_refuse()",
    "CREATE TRIGGER audit_entry_no_truncate BEFORE TRUNCATE ON audit_entry "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_refuse()",
]
_HEAD_SEQ = "(SELECT coalesce(max(seq), 0) FROM audit_entry)"
_HEAD_HASH = (
    f"coalesce((SELECT entry_hash FROM audit_entry WHERE seq = {_HEAD_SEQ}), "
    "'0000000000000000000000000000000000000000000000000000000000000000')"
)
_CHAIN_SQLITE = [
    f"""
CREATE TRIGGER audit_entry_seal AFTER INSERT ON audit_entry
BEGIN
    UPDATE audit_entry SET
        seq = {_HEAD_SEQ} + 1,
        prev_hash = {_HEAD_HASH},
        entry_hash = audit_entry_hash({_HEAD_HASH}, {_HEAD_SEQ} + 1,
            NEW.entity_id, NEW.entity_type, NEW.action, NEW.changed_by, NEW.client_name, NEW.changed_at,
            NEW.request_id, NEW.old_value, NEW.new_value)
    WHERE id = NEW.id;
END""",
    """
CREATE TRIGGER audit_entry_no_update BEFORE UPDATE ON audit_entry WHEN OLD.entry_hash IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'audit_entry is append-only: UPDATE refused');
END""",
    """
CREATE TRIGGER audit_entry_no_delete BEFORE DELETE ON audit_entry
BEGIN
    SELECT RAISE(ABORT, 'audit_entry is append-only: DELETE refused');
END""",
]


def upgrade() -> None:
    op.create_table(
        "entity",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("priority", sa.SmallInteger(), nullable=True),
        sa.Column("project_id", sa.Integer(), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.Column("deleted_at", _TIME, nullable=True),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.CheckConstraint(
            "kind <> 'task' OR (status IS NOT NULL AND priority IS NOT NULL AND project_id IS NOT NULL)",
            name="ck_entity_task_fields",
        ),
        sa.CheckConstraint("kind IN ('project', 'task')", name="ck_entity_kind"),
        sa.CheckConstraint(
            "status IS NULL OR status IN ('pending', 'in_progress', 'blocked', 'completed', 'cancelled')",
            name="ck_entity_status",
        ),
        sa.ForeignKeyConstraint(["project_id"], ["entity.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_entity_created_at", "entity", ["created_at"])
    op.create_index("ix_entity_kind_created", "entity", ["kind", "created_at", "id"])
    op.create_index("ix_entity_kind_priority", "entity", ["kind", "priority", "id"])
    op.create_index("ix_entity_kind_updated", "entity", ["kind", "updated_at", "id"])
    op.create_index("ix_entity_project_created", "entity", ["project_id", "created_at", "id"])
    op.create_index("ix_entity_status", "entity", ["status"])
    op.create_index("ix_entity_status_created", "entity", ["status", "created_at", "id"])
    op.create_index("ix_entity_title", "entity", ["title"])
    op.create_index(
        "uq_entity_live_project_title",
        "entity",
        ["title"],
        unique=True,
        sqlite_where=sa.text(_LIVE_PROJECT),
        postgresql_where=sa.text(_LIVE_PROJECT),
    )
    op.create_table(
        "idempotency_key",
        sa.Column("agent_id", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("tool", sa.String(length=64), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("result", _JSON, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("agent_id", "key"),
    )
    op.create_index("ix_idempotency_expires", "idempotency_key", ["expires_at"])
    op.create_table(
        "audit_entry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("entity_id", sa.Integer(), nullable=True),
        sa.Column("entity_type", sa.String(length=16), nullable=True),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("changed_by", sa.String(length=200), nullable=False),
        sa.Column("client_name", sa.String(length=200), nullable=True),
        sa.Column("changed_at", _TIME, nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("old_value", _JSON, nullable=True),
        sa.Column("new_value", _JSON, nullable=True),
        sa.Column("prev_hash", sa.String(length=64), nullable=True),
        sa.Column("entry_hash", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["entity_id"], ["entity.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_changed", "audit_entry", ["changed_at", "id"])
    op.create_index("ix_audit_changed_by_changed", "audit_entry", ["changed_by", "changed_at"])
    op.create_index("ix_audit_entity_changed", "audit_entry", ["entity_id", "changed_at", "id"])
    op.create_index("ix_audit_request", "audit_entry", ["request_id"])
    op.create_index("uq_audit_seq", "audit_entry", ["seq"], unique=True)
    postgresql_ = op.get_bind().dialect.name == "postgresql"
    for statement in _CHAIN_POSTGRESQL if postgresql_ else _CHAIN_SQLITE:
        op.execute(sa.DDL(statement))  # type: ignore[no-untyped-call]


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audit_entry_hash(audit_entry) CASCADE")
    op.drop_table("audit_entry")
    op.drop_table("idempotency_key")
    op.drop_table("entity")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audit_entry_seal() CASCADE")
        op.execute("DROP FUNCTION IF EXISTS audit_entry_refuse() CASCADE")
