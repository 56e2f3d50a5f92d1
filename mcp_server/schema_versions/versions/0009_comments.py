"""Comments on tasks: what one agent leaves for the next, append-only.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

A new table, empty, with triggers that refuse every UPDATE and DELETE of a comment (on
PostgreSQL the audit log's own refusing function, and TRUNCATE too). Constant time.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_POSTGRESQL = [
    "CREATE TRIGGER task_comment_append_only BEFORE UPDATE OR DELETE ON task_comment "
    "FOR EACH ROW EXECUTE FUNCTION audit_entry_refuse()",
    "CREATE TRIGGER task_comment_no_truncate BEFORE TRUNCATE ON task_comment "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_refuse()",
]
_SQLITE = [
    "CREATE TRIGGER task_comment_no_update BEFORE UPDATE ON task_comment "
    "BEGIN SELECT RAISE(ABORT, 'comments are append-only'); END",
    "CREATE TRIGGER task_comment_no_delete BEFORE DELETE ON task_comment "
    "BEGIN SELECT RAISE(ABORT, 'comments are append-only'); END",
]


def upgrade() -> None:
    op.create_table(
        "task_comment",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("task_id", _ID, sa.ForeignKey("entity.id"), nullable=False),
        sa.Column("author", sa.String(length=200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_task_comment_task", "task_comment", ["task_id", "id"])
    for statement in _POSTGRESQL if op.get_bind().dialect.name == "postgresql" else _SQLITE:
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("task_comment")
