"""The spoke's local record of finished cases. A result is written here before it is
published, so a redelivered experiment (after a crash or a lost connection) re-sends the
same result instead of running the case again."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from tributary.protocol.messages import ResultMessage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    experiment_id TEXT NOT NULL,
    case_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    message TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (experiment_id, case_id, attempt)
);
CREATE TABLE IF NOT EXISTS chain (
    sequence INTEGER PRIMARY KEY,
    record_sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked_digests (
    digest TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    revoked_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS handled_messages (
    message_id TEXT PRIMARY KEY,
    experiment_id TEXT NOT NULL,
    handled_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
"""


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def result(self, experiment_id: str, case_id: str, attempt: int = 1) -> ResultMessage | None:
        with self._lock:
            row = self._db.execute(
                "SELECT message FROM results WHERE experiment_id=? AND case_id=? AND attempt=?",
                (experiment_id, case_id, attempt)).fetchone()
        return ResultMessage.model_validate_json(row[0]) if row else None

    def chain_head(self) -> tuple[int, str | None]:
        """(last sequence, its record hash) of this spoke's custody chain."""
        with self._lock:
            row = self._db.execute(
                "SELECT sequence, record_sha256 FROM chain ORDER BY sequence DESC LIMIT 1"
            ).fetchone()
        return (row[0], row[1]) if row else (0, None)

    def record(self, message: ResultMessage, sequence: int | None = None,
               record_sha256: str | None = None) -> None:
        """Store a result and, in the same transaction, advance the custody chain."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO results (experiment_id, case_id, attempt, message) "
                    "VALUES (?, ?, ?, ?)",
                    (message.experiment_id, message.case_id, message.attempt,
                     message.model_dump_json()))
                if sequence is not None:
                    self._db.execute("INSERT INTO chain (sequence, record_sha256) VALUES (?, ?)",
                                     (sequence, record_sha256))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def revoke(self, digest: str, reason: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO revoked_digests (digest, reason) "
                             "VALUES (?, ?)", (digest, reason))

    def revocation(self, digest: str) -> str | None:
        """Why ``digest``'s approval was revoked, or None if it was not."""
        with self._lock:
            row = self._db.execute("SELECT reason FROM revoked_digests WHERE digest=?",
                                   (digest,)).fetchone()
        return row[0] if row else None

    def handled(self, message_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM handled_messages WHERE message_id=?",
                                    (message_id,)).fetchone() is not None

    def mark_handled(self, message_id: str, experiment_id: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO handled_messages (message_id, experiment_id) "
                             "VALUES (?, ?)", (message_id, experiment_id))

    def all_unpublished(self) -> list[ResultMessage]:
        """Every result not yet confirmed by the broker, in custody-chain order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT message FROM results WHERE published=0 ORDER BY rowid").fetchall()
        return [ResultMessage.model_validate_json(r[0]) for r in rows]

    def mark_published(self, message: ResultMessage) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE results SET published=1 WHERE experiment_id=? AND case_id=? "
                "AND attempt=?", (message.experiment_id, message.case_id, message.attempt))

    def unpublished(self, experiment_id: str) -> list[ResultMessage]:
        with self._lock:
            rows = self._db.execute(
                "SELECT message FROM results WHERE experiment_id=? AND published=0",
                (experiment_id,)).fetchall()
        return [ResultMessage.model_validate_json(r[0]) for r in rows]

    def close(self) -> None:
        self._db.close()
