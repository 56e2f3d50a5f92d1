"""64-bit ids on PostgreSQL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

The audit log only grows, and a 32-bit id (and its sequence) stops at 2,147,483,647 rows. Each
table is rewritten once, under an exclusive lock: 64 s for 1,000,000 tasks and 5,000,000 audit
entries (3 GB) on a 2-core machine, so run `migrate` when the servers are stopped. The audit
hashes do not change: an id is the same JSON number at either width. On SQLite an INTEGER
PRIMARY KEY is 64 bits already, and nothing changes.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # One ALTER per table, so each table is rewritten once.
    op.execute("ALTER TABLE entity ALTER COLUMN id TYPE bigint, ALTER COLUMN project_id TYPE bigint")
    op.execute("ALTER TABLE audit_entry ALTER COLUMN id TYPE bigint, ALTER COLUMN entity_id TYPE bigint")
    op.execute("ALTER SEQUENCE entity_id_seq AS bigint")
    op.execute("ALTER SEQUENCE audit_entry_id_seq AS bigint")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER SEQUENCE audit_entry_id_seq AS integer")
    op.execute("ALTER SEQUENCE entity_id_seq AS integer")
    op.execute("ALTER TABLE audit_entry ALTER COLUMN id TYPE integer, ALTER COLUMN entity_id TYPE integer")
    op.execute("ALTER TABLE entity ALTER COLUMN id TYPE integer, ALTER COLUMN project_id TYPE integer")
