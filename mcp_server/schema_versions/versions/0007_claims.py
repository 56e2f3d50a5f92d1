"""Claims on tasks: who holds a task, until when, and its fencing token.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

Three columns on `entity`, an index on the holder, and the ready queue's index: the tasks that
may be claimed, most urgent then oldest first. On PostgreSQL 11 and later, a column added with a
constant default is not written into existing rows, and SQLite adds columns in place; the queue's
index is built from the tasks.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HELD = sa.text("claimed_by IS NOT NULL")
_QUEUE = sa.text("kind = 'task' AND deleted_at IS NULL AND status IN ('pending', 'in_progress')")


def upgrade() -> None:
    op.add_column("entity", sa.Column("claimed_by", sa.String(length=200), nullable=True))
    op.add_column("entity", sa.Column("claim_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "entity", sa.Column("fencing_token", sa.BigInteger(), nullable=False, server_default=sa.text("0"))
    )
    op.create_index(
        "ix_entity_claimed_by",
        "entity",
        ["claimed_by", "claim_expires_at"],
        sqlite_where=_HELD,
        postgresql_where=_HELD,
    )
    op.create_index(
        "ix_entity_queue",
        "entity",
        [sa.text("priority DESC"), "created_at", "id"],
        sqlite_where=_QUEUE,
        postgresql_where=_QUEUE,
    )


def downgrade() -> None:
    op.drop_index("ix_entity_queue", table_name="entity")
    op.drop_index("ix_entity_claimed_by", table_name="entity")
    for column in ("fencing_token", "claim_expires_at", "claimed_by"):
        op.drop_column("entity", column)
