"""One holder at a time of a hub-wide duty, among every hub process on one database.

Some work must run in exactly one process of a hub however many run (web apps, `tributary
hub train`): the training round loop routes SecAgg+ stages and decides when a stage
closes, and two loops deciding at once would send a stage twice or close it on different
views. The lease is the database's own lock, so it needs nothing beside the database and
is released by the operating system or the database server when its holder dies, kill -9
included; another process then takes it on its next try:

- PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) on a connection kept
  for the lease's lifetime; a holder whose connection is lost has lost the lock, and
  :meth:`Lease.held` says so.
- SQLite: an exclusive ``flock`` on a file beside the database (every process of such a hub
  shares one machine).
- An in-memory database belongs to one process: the lease is always granted."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)


def lock_key(name: str) -> int:
    """The advisory lock's 64-bit key for a duty's name (stable across processes)."""
    return int.from_bytes(hashlib.sha256(f"tributary-lease:{name}".encode()).digest()[:8],
                          "big", signed=True)


class Lease:
    """The lease of the duty ``name`` on ``engine``'s database. Not thread-safe: one thread
    (the duty's loop) tries, checks and releases it."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine, self.name = engine, name
        self._backend = engine.url.get_backend_name()
        self._connection: Any = None  # PostgreSQL: the connection holding the lock
        self._file: Any = None  # SQLite: the locked file
        self._memory_held = False

    def path(self) -> Path | None:
        """The lock file of a SQLite database (None for other databases)."""
        database = self.engine.url.database
        if self._backend != "sqlite" or not database or database == ":memory:":
            return None
        return Path(database).with_name(f"{Path(database).name}.{self.name}.lease")

    def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; whether this process holds it now."""
        if self.held():
            return True
        if self._backend == "postgresql":
            return self._try_postgresql()
        path = self.path()
        if path is None:
            self._memory_held = True
            return True
        handle = open(path, "a")  # noqa: SIM115 - kept open while the lease is held
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return True

    def _try_postgresql(self) -> bool:
        connection = self.engine.raw_connection()
        try:
            cursor = connection.cursor()
            cursor.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(self.name),))
            granted = bool(cursor.fetchone()[0])
            cursor.close()
            connection.commit()
        except Exception:
            connection.invalidate()
            raise
        if not granted:
            connection.close()
            return False
        self._connection = connection
        return True

    def held(self) -> bool:
        """Whether this process still holds the lease. On PostgreSQL this asks the server on
        the lock's connection: a lost connection is a lost lease."""
        if self._file is not None or self._memory_held:
            return True
        if self._connection is None:
            return False
        try:
            cursor = self._connection.cursor()
            cursor.execute("SELECT 1")
            cursor.fetchone()
            cursor.close()
            self._connection.commit()
            return True
        except Exception as exc:  # the server or the network went away: the lock with it
            log.warning("lease %s lost with its database connection: %s", self.name, exc)
            self._drop_connection()
            return False

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        with contextlib.suppress(Exception):  # already gone
            connection.invalidate()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        self._memory_held = False
        if self._connection is not None:
            try:
                cursor = self._connection.cursor()
                cursor.execute("SELECT pg_advisory_unlock(%s)", (lock_key(self.name),))
                cursor.close()
                self._connection.commit()
                self._connection.close()
                self._connection = None
            except Exception:
                self._drop_connection()
