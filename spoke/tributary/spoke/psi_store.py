"""Where a spoke keeps its PSIs: tables of its own in the journal database, so each step
(a relayed message handled, its answer put in the outbox) is one transaction with the
outbox and happens exactly once across redeliveries and restarts.

- ``psi_requests``: each hub-signed request, its state, the steward's decision, the
  spoke's snapshot of its identifiers (taken at approval, so every step of the PSI uses
  the same ordered set) and its secrets (ephemeral X25519 keys, the leader's link secret).
  These never leave the spoke; they are as private as ``spoke.key`` beside them.
- ``psi_peers``: per (PSI, peer): the peer's X25519 public key, the PSI client's key and,
  at the leader, the pairwise result.
- ``psi_inbox``: relayed messages, keyed by the sender's message id (a redelivery is a
  no-op), processed in arrival order once their PSI is approved.

:class:`PsiDesk` is the steward's view (another process, its own connection)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tributary.protocol.cohorts.psi import PsiForward, PsiRequest

TABLES = (
    """CREATE TABLE IF NOT EXISTS psi_requests (
        psi_id TEXT PRIMARY KEY,
        message TEXT NOT NULL,
        state TEXT NOT NULL,
        steward TEXT,
        decided_by TEXT,
        reason TEXT,
        items TEXT,
        secrets TEXT,
        received_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
    )""",
    """CREATE TABLE IF NOT EXISTS psi_peers (
        psi_id TEXT NOT NULL,
        peer TEXT NOT NULL,
        peer_public TEXT,
        client_key TEXT,
        result TEXT,
        PRIMARY KEY (psi_id, peer)
    )""",
    """CREATE TABLE IF NOT EXISTS psi_inbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        relay_message_id TEXT NOT NULL UNIQUE,
        psi_id TEXT NOT NULL,
        message TEXT NOT NULL,
        processed INTEGER NOT NULL DEFAULT 0
    )""",
)

# Steward decisions: pending -> approved | rejected (the steward) -> applied (the agent).
PENDING, APPROVED, REJECTED, APPLIED = "pending", "approved", "rejected", "applied"


def create_tables(db: sqlite3.Connection) -> None:
    for statement in TABLES:
        db.execute(statement)


@dataclass
class PsiRow:
    request: PsiRequest
    state: str
    steward: str | None
    decided_by: str | None
    reason: str | None
    items: list[str] | None
    secrets: dict[str, Any]
    received_at: str


def read_psi(db: sqlite3.Connection, psi_id: str) -> PsiRow | None:
    row = db.execute("SELECT message, state, steward, decided_by, reason, items, secrets, "
                     "received_at FROM psi_requests WHERE psi_id=?", (psi_id,)).fetchone()
    return _row(row) if row else None


def _row(row: tuple[Any, ...]) -> PsiRow:
    return PsiRow(PsiRequest.model_validate_json(row[0]), row[1], row[2], row[3], row[4],
                  json.loads(row[5]) if row[5] else None,
                  json.loads(row[6]) if row[6] else {}, row[7])


def psis_where(db: sqlite3.Connection, clause: str, args: tuple[Any, ...] = ()) -> list[PsiRow]:
    rows = db.execute("SELECT message, state, steward, decided_by, reason, items, secrets, "
                      f"received_at FROM psi_requests WHERE {clause} ORDER BY received_at",
                      args).fetchall()
    return [_row(r) for r in rows]


def add_forward(db: sqlite3.Connection, forward: PsiForward) -> bool:
    cursor = db.execute("INSERT OR IGNORE INTO psi_inbox (relay_message_id, psi_id, message) "
                        "VALUES (?, ?, ?)", (forward.relay_message_id, forward.psi_id,
                                             forward.model_dump_json()))
    return cursor.rowcount == 1


class PsiDesk:
    """The steward's side: list the PSI requests held for a decision, and decide."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        create_tables(self._db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PsiDesk:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def requests(self, everything: bool = False) -> list[PsiRow]:
        if everything:
            return psis_where(self._db, "1=1")
        return psis_where(self._db, "steward=?", (PENDING,))

    def decide(self, psi_id: str, approve: bool, steward: str, reason: str | None) -> None:
        cursor = self._db.execute(
            "UPDATE psi_requests SET steward=?, decided_by=?, reason=? "
            "WHERE psi_id=? AND steward=?",
            (APPROVED if approve else REJECTED, steward, reason, psi_id, PENDING))
        if cursor.rowcount != 1:
            raise LookupError(f"no PSI request {psi_id!r} waits for a decision")
