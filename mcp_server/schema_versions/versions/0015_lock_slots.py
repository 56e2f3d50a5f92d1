"""Lock slots: writers that take turns lock rows only the server's roles may lock, instead of
advisory locks that any role able to connect could take and hold.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08

A new table of 1,026 rows. Constant time.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# locks.SLOTS as it was when this migration was written: (space, number of slots).
SLOTS = ((1, 1024), (2, 1), (3, 1))


def upgrade() -> None:
    table = op.create_table(
        "lock_slot",
        sa.Column("space", sa.SmallInteger(), primary_key=True),
        sa.Column("slot", sa.Integer(), primary_key=True),
    )
    op.bulk_insert(table, [{"space": space, "slot": slot} for space, count in SLOTS for slot in range(count)])


def downgrade() -> None:
    op.drop_table("lock_slot")
