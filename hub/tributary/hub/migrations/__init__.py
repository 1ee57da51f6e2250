"""Schema migrations (Alembic). The hub's database is brought to the newest schema when the
hub (or any command that opens the database) starts, so upgrading Tributary keeps every
experiment, result and audit entry; `tributary hub migrate` does it on demand.

A new migration after changing ``hub/models.py``::

    alembic -c hub/migrations/alembic.ini revision --autogenerate -m "what changed"

``tests/test_hub_migrations.py`` fails while the models and the migrations disagree."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

#: The schema every hub had before migrations existed; such a database is adopted at it.
BASELINE = "0001"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "tributary.hub:migrations")
    config.attributes["connection"] = connection
    return config


def head() -> str:
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert revision is not None
    return revision


def current(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


@contextlib.contextmanager
def _exclusive(engine: Engine) -> Iterator[None]:
    """One migrator at a time: the hub, its Celery workers and the CLI may start together.
    SQLite files take a lock file beside the database; PostgreSQL an advisory lock."""
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and database and database != ":memory:":
        with open(Path(database).with_name(Path(database).name + ".migrate.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
        return
    if engine.url.get_backend_name() == "postgresql":
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT pg_advisory_lock(7262531)")
            try:
                yield
            finally:
                connection.exec_driver_sql("SELECT pg_advisory_unlock(7262531)")
        return
    yield


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to the newest schema; returns the revisions before and after
    (before is None for a new database)."""
    with _exclusive(engine), engine.begin() as connection:
        config = alembic_config(connection)
        before = MigrationContext.configure(connection).get_current_revision()
        if before is None and "algorithm" in set(inspect(connection).get_table_names()):
            # Made by a hub from before migrations (tables created directly): adopt it.
            command.stamp(config, BASELINE)
            before = BASELINE
        command.upgrade(config, "head")
    return before, head()
