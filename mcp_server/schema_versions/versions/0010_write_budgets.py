"""Write budgets: what each agent has written in its current window.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

A new table, empty, one row per agent with a budget. Constant time.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "write_budget",
        sa.Column("agent_id", sa.String(length=200), primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("calls_used", sa.Integer(), nullable=False),
        sa.Column("rows_used", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("write_budget")
