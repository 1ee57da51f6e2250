"""The spoke's record of vertical studies (SQLite, ``work_dir/vertical.sqlite``): each
invitation waits here for the site's data steward, and each study's party state (its
Paillier private key, weights, masks, the answers already given) is kept sealed
(ChaCha20-Poly1305 under a key in its own file), written in one transaction before any
answer leaves, so a redelivered message, or one arriving after a restart, gets the answer
already given and a mask is never drawn twice for one round."""

from __future__ import annotations

import secrets
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from pydantic import BaseModel, ConfigDict, Field

from tributary.protocol.cohorts.vertical import Invite
from tributary.protocol.cohorts.vertical_lr import PartyState

PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"
#: After the steward: the spoke accepted (state kept), refused or finished the study.
ACCEPTED, REFUSED, FINISHED = "accepted", "refused", "finished"
_AD = b"tributary vertical study state v1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vertical_studies (
    study_id TEXT PRIMARY KEY,
    invite TEXT NOT NULL,
    state TEXT NOT NULL,
    steward TEXT,
    reason TEXT,
    sealed BLOB,
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
"""


class StudyState(BaseModel):
    """What the spoke keeps of an accepted study: the party's state and the linked rows'
    columns as they were read at acceptance (a catalog refreshed mid-study does not
    change the rows under a running model)."""

    model_config = ConfigDict(extra="forbid")

    party: PartyState
    columns: list[list[float]]
    y: list[float] | None = None
    final: str | None = Field(None, description="The final message's JSON, once sent.")


@dataclass(frozen=True)
class HeldStudy:
    study_id: str
    invite: Invite
    state: str
    steward: str | None
    reason: str | None


class VerticalDesk:
    def __init__(self, path: Path, key: bytes) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._db.commit()
        self._aead = ChaCha20Poly1305(key)

    def close(self) -> None:
        self._db.close()

    def hold(self, invite: Invite) -> bool:
        """Keep an invitation for the steward; False if the study is already here."""
        with self._lock, self._db:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO vertical_studies (study_id, invite, state) "
                "VALUES (?, ?, ?)", (invite.study_id, invite.model_dump_json(), PENDING))
            return cursor.rowcount == 1

    def get(self, study_id: str) -> HeldStudy | None:
        row = self._db.execute(
            "SELECT study_id, invite, state, steward, reason FROM vertical_studies "
            "WHERE study_id = ?", (study_id,)).fetchone()
        return None if row is None else HeldStudy(
            row[0], Invite.model_validate_json(row[1]), row[2], row[3], row[4])

    def studies(self, *states: str) -> list[HeldStudy]:
        rows = self._db.execute("SELECT study_id FROM vertical_studies ORDER BY updated_at")
        found = [self.get(r[0]) for r in rows.fetchall()]
        return [s for s in found if s is not None and (not states or s.state in states)]

    def decide(self, study_id: str, approve: bool, steward: str, reason: str | None = None
               ) -> None:
        """The steward's decision on a pending study (``tributary spoke steward``)."""
        with self._lock, self._db:
            cursor = self._db.execute(
                "UPDATE vertical_studies SET state = ?, steward = ?, reason = ?, "
                "updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') "
                "WHERE study_id = ? AND state = ?",
                (APPROVED if approve else REJECTED, steward, reason, study_id, PENDING))
            if cursor.rowcount != 1:
                raise LookupError(f"no pending vertical study {study_id}")

    def set_state(self, study_id: str, state: str, reason: str | None = None,
                  study: StudyState | None = None) -> None:
        with self._lock, self._db:
            self._db.execute(
                "UPDATE vertical_studies SET state = ?, reason = COALESCE(?, reason), "
                "sealed = ?, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') "
                "WHERE study_id = ?",
                (state, reason, None if study is None else self._seal(study), study_id))

    def save(self, study_id: str, study: StudyState) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE vertical_studies SET sealed = ? WHERE study_id = ?",
                             (self._seal(study), study_id))

    def load(self, study_id: str) -> StudyState | None:
        row = self._db.execute("SELECT sealed FROM vertical_studies WHERE study_id = ?",
                               (study_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        blob = bytes(row[0])
        try:
            plain = self._aead.decrypt(blob[:12], blob[12:], _AD)
        except InvalidTag:
            raise ValueError(f"the sealed state of vertical study {study_id} fails "
                             "authentication") from None
        return StudyState.model_validate_json(plain)

    def _seal(self, study: StudyState) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, study.model_dump_json().encode(), _AD)
