"""Alembic environment: migrations run on the connection the console hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from devicebridge.clinic.schema import metadata


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER much
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through devicebridge.clinic.db.migrate()")
run_on(connection)
