# ruff: noqa: E501, S608  -- SQL text as the database stores it; built only from constants
"""The audit chain is sealed after commit: writers take no shared lock.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

Until now each insert into audit_entry took one advisory lock (PostgreSQL) and linked itself to
the newest entry, so every writing transaction waited for the one before it to commit. From here
on an insert only stamps its row: the id of the transaction that wrote it (`txid`) and a hash of
its content (`row_hash`). A sealer (mcp_server/sealer.py) later gives committed rows their
position and link in `audit_seal`, in the order it sees them committed, and signs checkpoints of
the head into `audit_checkpoint`; `audit_chain` holds the head, the sealer's horizon and its lease.

Entries written before this migration keep the position and hashes they were sealed with, in
their own columns; the first seal links to the newest of them, so the chain runs on across the
boundary. Nothing is rewritten: the migration takes constant time however long the log is.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)
_GENESIS = "0" * 64

_POSTGRESQL = [
    # The content a row's hash covers; to_char, not a cast, so no session setting changes the text.
    """
CREATE OR REPLACE FUNCTION audit_row_hash(e audit_entry) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT encode(sha256(convert_to(jsonb_build_array(
        e.id, e.txid, e.entity_id, e.entity_type, e.action, e.changed_by, e.client_name,
        to_char(e.changed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        e.request_id, e.old_value, e.new_value)::text, 'UTF8')), 'hex')
$$""",
    # Whatever the inserting statement says, the row gets its writer's transaction id and its
    # content hash, and no position: only the sealer gives positions.
    """
CREATE OR REPLACE FUNCTION audit_entry_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.txid := pg_current_xact_id()::text::bigint;
    NEW.seq := NULL;
    NEW.prev_hash := NULL;
    NEW.entry_hash := NULL;
    NEW.row_hash := audit_row_hash(NEW);
    RETURN NEW;
END $$""",
    "DROP TRIGGER audit_entry_seal ON audit_entry",
    "DROP FUNCTION audit_entry_seal()",
    "CREATE TRIGGER audit_entry_stamp BEFORE INSERT ON audit_entry FOR EACH ROW EXECUTE FUNCTION audit_entry_stamp()",
    "CREATE TRIGGER audit_seal_append_only BEFORE UPDATE OR DELETE ON audit_seal "
    "FOR EACH ROW EXECUTE FUNCTION audit_entry_refuse()",
    "CREATE TRIGGER audit_seal_no_truncate BEFORE TRUNCATE ON audit_seal "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_refuse()",
    "CREATE TRIGGER audit_checkpoint_append_only BEFORE UPDATE OR DELETE ON audit_checkpoint "
    "FOR EACH ROW EXECUTE FUNCTION audit_entry_refuse()",
    "CREATE TRIGGER audit_checkpoint_no_truncate BEFORE TRUNCATE ON audit_checkpoint "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_refuse()",
]

_SQLITE = [
    "DROP TRIGGER audit_entry_seal",
    "DROP TRIGGER audit_entry_no_update",
    # SQLite cannot change NEW before an insert; the row is stamped right after it, in the same
    # statement. audit_txid() and audit_row_hash() are registered on each connection (db.py).
    """
CREATE TRIGGER audit_entry_stamp AFTER INSERT ON audit_entry
BEGIN
    UPDATE audit_entry SET
        txid = audit_txid(),
        seq = NULL, prev_hash = NULL, entry_hash = NULL,
        row_hash = audit_row_hash(NEW.id, audit_txid(), NEW.entity_id, NEW.entity_type, NEW.action,
            NEW.changed_by, NEW.client_name, NEW.changed_at, NEW.request_id, NEW.old_value, NEW.new_value)
    WHERE id = NEW.id;
END""",
    """
CREATE TRIGGER audit_entry_no_update BEFORE UPDATE ON audit_entry
WHEN OLD.row_hash IS NOT NULL OR OLD.entry_hash IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'audit_entry is append-only: UPDATE refused');
END""",
    """
CREATE TRIGGER audit_seal_no_update BEFORE UPDATE ON audit_seal
BEGIN
    SELECT RAISE(ABORT, 'audit_seal is append-only: UPDATE refused');
END""",
    """
CREATE TRIGGER audit_seal_no_delete BEFORE DELETE ON audit_seal
BEGIN
    SELECT RAISE(ABORT, 'audit_seal is append-only: DELETE refused');
END""",
    """
CREATE TRIGGER audit_checkpoint_no_update BEFORE UPDATE ON audit_checkpoint
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoint is append-only: UPDATE refused');
END""",
    """
CREATE TRIGGER audit_checkpoint_no_delete BEFORE DELETE ON audit_checkpoint
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoint is append-only: DELETE refused');
END""",
]


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.add_column("audit_entry", sa.Column("txid", sa.BigInteger(), nullable=True))
    op.add_column("audit_entry", sa.Column("row_hash", sa.String(length=64), nullable=True))
    # Where the sealer looks for work: the rows at or past its horizon, in the order it seals them.
    # Partial: entries sealed the old way have no txid, and an index of 5,000,000 of them made
    # every look past the horizon walk them all (200 ms on PostgreSQL 15, against 0.1 ms).
    op.create_index(
        "ix_audit_txid",
        "audit_entry",
        ["txid", "id"],
        postgresql_where=sa.text("txid IS NOT NULL"),
        sqlite_where=sa.text("txid IS NOT NULL"),
    )
    op.create_table(
        "audit_seal",
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("entry_id", sa.BigInteger() if postgresql else sa.Integer(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("entry_hash", sa.String(length=64), nullable=False),
        sa.Column("sealed_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["entry_id"], ["audit_entry.id"]),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("entry_id", name="uq_audit_seal_entry"),
    )
    op.create_table(
        "audit_chain",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("head_seq", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(length=64), nullable=False),
        sa.Column("horizon", sa.BigInteger(), nullable=False),
        sa.Column("sealer", sa.String(length=200), nullable=True),
        sa.Column("lease_until", _TIME, nullable=True),
        sa.CheckConstraint("id = 1", name="ck_audit_chain_one_row"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "audit_checkpoint",
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(length=64), nullable=False),
        sa.Column("signed_at", _TIME, nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    # The head the first seal links to: the newest entry sealed the old way. The horizon: on
    # PostgreSQL the oldest transaction still running, whose rows may come later; on SQLite,
    # where rows commit in id order, the newest id.
    head_seq = "(SELECT coalesce(max(seq), 0) FROM audit_entry)"
    head_hash = f"coalesce((SELECT entry_hash FROM audit_entry WHERE seq = {head_seq}), '{_GENESIS}')"
    horizon = (
        "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
        if postgresql
        else "(SELECT coalesce(max(id), 0) FROM audit_entry)"
    )
    op.execute(
        f"INSERT INTO audit_chain (id, head_seq, head_hash, horizon) VALUES (1, {head_seq}, {head_hash}, {horizon})"
    )
    for statement in _POSTGRESQL if postgresql else _SQLITE:
        op.execute(sa.DDL(statement))  # type: ignore[no-untyped-call]


def downgrade() -> None:
    raise NotImplementedError(
        "entries sealed after commit have no position in audit_entry; the chain cannot go back"
    )
