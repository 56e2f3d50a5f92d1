"""Changesets: a change bound to the tasks and versions it was previewed on, held for approval.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07

Two new tables, empty. Constant time.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "changeset",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("tool", sa.String(length=40), nullable=False),
        sa.Column("operation", _JSON, nullable=False),
        sa.Column("summary", sa.String(length=300), nullable=False),
        sa.Column("task_count", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_by", sa.String(length=200), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("applied_request_id", sa.String(length=64), nullable=True),
        sa.Column("permissions", _JSON, nullable=False),
    )
    op.create_index("ix_changeset_state_created", "changeset", ["state", "created_at"])
    op.create_table(
        "changeset_item",
        # No foreign keys (models.ChangesetItem says why).
        sa.Column("changeset_id", sa.String(length=32), primary_key=True),
        sa.Column("task_id", _ID, primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("before", _JSON, nullable=False),
        sa.Column("after", _JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("changeset_item")
    op.drop_table("changeset")
