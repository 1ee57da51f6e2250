"""Engine and session factory. SQLite (the default) gets WAL and a busy timeout so the API
and the results consumer can write from different threads. Opening the database brings
its schema up to date (:mod:`tributary.hub.migrations`)."""

from collections.abc import Iterator

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from tributary.hub import migrations
from tributary.hub.settings import HubSettings

#: Connections kept open per process, and opened beyond them under load (see make_engine).
POOL_SIZE = 5
POOL_OVERFLOW = 45


def make_engine(database_url: str, migrate: bool = True) -> Engine:
    sqlite = database_url.startswith("sqlite")
    # More connections than the web server has threads (anyio's 40, plus the live feeds
    # and the debouncer): a request holds its connection from its authentication until its
    # handler runs, and with fewer connections than threads a burst of requests can leave
    # every thread waiting for a connection held by a request waiting for a thread.
    engine = create_engine(
        database_url, connect_args={"check_same_thread": False, "timeout": 30} if sqlite else {},
        # SQLite connections are a file handle: keep more of them than a server's
        pool_size=POOL_SIZE * 4 if sqlite else POOL_SIZE, max_overflow=POOL_OVERFLOW,
    )
    if sqlite:
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    if migrate:
        upgrade_schema(engine)
    return engine


def open_database(settings: HubSettings) -> Engine:
    """The hub's database as every process that opens it (hub, Celery workers, CLI) should
    have it: its forensic log attached, then its schema brought up to date (audited)."""
    from tributary.hub.services.audit import attach_forensic_log  # services import this

    engine = make_engine(settings.database_url, migrate=False)
    attach_forensic_log(engine, settings.audit_log_path())
    upgrade_schema(engine)
    return engine


def upgrade_schema(engine: Engine, actor: str = "hub") -> tuple[str | None, str]:
    """Migrate to the newest schema and audit the change, if any; returns the revisions
    before (None: a new database) and after.
    (Attach the forensic log first where it is not the default one beside the database.)"""
    before, after = migrations.upgrade(engine)
    if before != after:
        from tributary.hub.services import audit  # services import this module

        with Session(engine) as session:
            if before is None:
                audit.record(session, actor, "hub.schema_created", "database", revision=after)
            else:
                audit.record(session, actor, "hub.schema_upgraded", "database",
                             from_revision=before, to_revision=after)
            session.commit()
    return before, after


def sessions(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session
