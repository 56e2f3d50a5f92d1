"""Refusal tallies: a refused call's repeats counted, not each written to the audit log.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-08

A new table, empty. Constant time.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "refusal_tally",
        sa.Column("agent_id", sa.String(length=200), primary_key=True),
        sa.Column("tool", sa.String(length=100), primary_key=True),
        sa.Column("permission", sa.String(length=200), primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("repeats", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("refusal_tally")
