"""Alembic's environment: migrations run on the connection the hub hands over (see
:func:`tributary.hub.migrations.upgrade`), or on ``sqlalchemy.url`` from alembic.ini."""

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlmodel import SQLModel

import tributary.hub.models  # noqa: F401  (registers the tables on SQLModel.metadata)

config = context.config
target_metadata = SQLModel.metadata


def run(connection) -> None:  # type: ignore[no-untyped-def]
    # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = engine_from_config(config.get_section(config.config_ini_section, {}),
                                prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as fresh:
        run(fresh)
