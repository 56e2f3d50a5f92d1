"""The built-in OAuth authorization server's tables: clients, grants and what it hands out.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

Clients registered by dynamic registration (RFC 7591), the grants operators give on the consent
page (client X acts as agent Y), the requests, codes and tokens issued for them, each stored as
the SHA-256 of its value, and operators' recent failed sign-ins. All are new and empty: the
migration takes constant time.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(JSONB(), "postgresql")
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "oauth_client",
        sa.Column("client_id", sa.String(length=64), primary_key=True),
        sa.Column("info", _JSON, nullable=False),
        sa.Column("registered_at", _TIME, nullable=False),
    )
    op.create_index("ix_oauth_client_registered", "oauth_client", ["registered_at"])
    op.create_table(
        "oauth_grant",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("client_id", sa.String(length=64), sa.ForeignKey("oauth_client.client_id"), nullable=False),
        sa.Column("agent_id", sa.String(length=200), nullable=False),
        sa.Column("read_only", sa.Boolean(), nullable=False),
        sa.Column("scopes", _JSON, nullable=False),
        sa.Column("resource", sa.String(length=2000), nullable=True),
        sa.Column("granted_by", sa.String(length=200), nullable=False),
        sa.Column("granted_at", _TIME, nullable=False),
        sa.Column("revoked_at", _TIME, nullable=True),
    )
    op.create_index("ix_oauth_grant_client", "oauth_grant", ["client_id"])
    op.create_table(
        "oauth_secret",
        sa.Column("value_sha256", sa.String(length=64), primary_key=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("client_id", sa.String(length=64), sa.ForeignKey("oauth_client.client_id"), nullable=False),
        sa.Column("grant_id", _ID, sa.ForeignKey("oauth_grant.id"), nullable=True),
        sa.Column("details", _JSON, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.Column("used_at", _TIME, nullable=True),
    )
    op.create_index("ix_oauth_secret_grant", "oauth_secret", ["grant_id"])
    op.create_index("ix_oauth_secret_expires", "oauth_secret", ["expires_at"])
    op.create_table(
        "operator_sign_in",
        sa.Column("operator_id", sa.String(length=200), primary_key=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("window_started_at", _TIME, nullable=False),
        sa.Column("locked_until", _TIME, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("operator_sign_in")
    op.drop_table("oauth_secret")
    op.drop_table("oauth_grant")
    op.drop_table("oauth_client")
