"""The duplicate guard: each task's title key, and an index of live tasks by project and key.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

A nullable column on `entity`, filled for every task (deleted ones too, which may be restored)
from its title by the server's own function (titles.key), in batches of 10,000 by id; then the
partial index, of keyed live tasks only, so that no other query can use it. Linear in the number
of tasks: 62 s for a million on PostgreSQL (bench/generate.py's data).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from mcp_server import titles

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 10_000
_LIVE_TASK = sa.text("kind = 'task' AND deleted_at IS NULL AND title_key IS NOT NULL")
_NEXT = sa.text("SELECT id, title FROM entity WHERE kind = 'task' AND id > :after ORDER BY id LIMIT :batch")
_FILL_POSTGRESQL = sa.text(
    "UPDATE entity SET title_key = filled.key FROM unnest(CAST(:ids AS bigint[]), CAST(:keys AS text[])) "
    "AS filled(id, key) WHERE entity.id = filled.id"
)
_FILL_SQLITE = sa.text("UPDATE entity SET title_key = :key WHERE id = :id")


def upgrade() -> None:
    op.add_column("entity", sa.Column("title_key", sa.String(length=32), nullable=True))
    conn = op.get_bind()
    postgresql = conn.dialect.name == "postgresql"
    after = 0
    while rows := conn.execute(_NEXT, {"after": after, "batch": BATCH}).all():
        keys = [titles.key(row.title) for row in rows]
        if postgresql:
            conn.execute(_FILL_POSTGRESQL, {"ids": [row.id for row in rows], "keys": keys})
        else:
            conn.execute(_FILL_SQLITE, [{"id": row.id, "key": k} for row, k in zip(rows, keys, strict=True)])
        after = rows[-1].id
    op.create_index(
        "ix_entity_title_key",
        "entity",
        ["project_id", "title_key"],
        sqlite_where=_LIVE_TASK,
        postgresql_where=_LIVE_TASK,
    )


def downgrade() -> None:
    op.drop_index("ix_entity_title_key", table_name="entity")
    op.drop_column("entity", "title_key")
