"""Engine and session factory. SQLite (the default) gets WAL and a busy timeout so the API
and the results consumer can write from different threads."""

from collections.abc import Iterator

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine


def make_engine(database_url: str) -> Engine:
    sqlite = database_url.startswith("sqlite")
    engine = create_engine(
        database_url, connect_args={"check_same_thread": False, "timeout": 30} if sqlite else {}
    )
    if sqlite:
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    SQLModel.metadata.create_all(engine)
    return engine


def sessions(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session
