"""Alembic's entry point: run the migrations on the connection the caller hands in (schema.py)."""

from alembic import context
from sqlmodel import SQLModel

from mcp_server import models  # noqa: F401  (the tables, for autogenerate)

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    compare_type=True,
    # SQLite alters a table by copying it; Alembic's batch mode does the copying.
    render_as_batch=connection.dialect.name == "sqlite",
    # Both databases roll DDL back with the transaction, so an upgrade that fails leaves nothing.
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
