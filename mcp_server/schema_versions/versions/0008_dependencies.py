"""Dependencies between tasks: a task waits for the tasks that block it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

One new table of edges (task, blocker), with the reverse index for "what does this task block".
New and empty: the migration takes constant time.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "task_dependency",
        sa.Column("task_id", _ID, sa.ForeignKey("entity.id"), primary_key=True),
        sa.Column("blocked_by", _ID, sa.ForeignKey("entity.id"), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("task_id <> blocked_by", name="ck_task_dependency_not_itself"),
    )
    op.create_index("ix_task_dependency_blocked_by", "task_dependency", ["blocked_by", "task_id"])


def downgrade() -> None:
    op.drop_table("task_dependency")
