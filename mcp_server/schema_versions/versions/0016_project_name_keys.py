"""Project names compared by their skeletons: each project's name key, and an index of live
projects by it.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-08

Fills `title_key` of every project (deleted ones too, which may be restored) from its name by the
server's own function (titles.name_key), then the partial index of live projects by key. Projects
are few: linear in their number. Live projects whose names already read the same keep them; only
new names, renames and restores are checked.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from mcp_server import titles

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE_PROJECT = sa.text("kind = 'project' AND deleted_at IS NULL")
_PROJECTS = sa.text("SELECT id, title FROM entity WHERE kind = 'project'")
_FILL = sa.text("UPDATE entity SET title_key = :key WHERE id = :id")


def upgrade() -> None:
    conn = op.get_bind()
    if filled := [{"id": row.id, "key": titles.name_key(row.title)} for row in conn.execute(_PROJECTS)]:
        conn.execute(_FILL, filled)
    op.create_index(
        "ix_entity_project_name_key",
        "entity",
        ["title_key"],
        sqlite_where=_LIVE_PROJECT,
        postgresql_where=_LIVE_PROJECT,
    )


def downgrade() -> None:
    op.drop_index("ix_entity_project_name_key", table_name="entity")
    op.execute("UPDATE entity SET title_key = NULL WHERE kind = 'project'")
