"""Study-scoped linking tables: which local case each linking pseudonym of a private set
intersection stands for.

A PSI in intersection mode gives each participating spoke the same pseudonym for each shared
patient, scoped to that PSI (its ``psi_id``). Only the spoke can map a pseudonym back to its
own case, through this table, which lives in the spoke's private work folder beside the
catalog and never leaves the institution. Vertical studies name the PSI whose linked cohort
they train on and read their rows through :meth:`Linkage.cases`, in the agreed order of the
pseudonyms, so every party lines up the same patients without learning anyone else's."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS links (
    psi_id TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    case_id TEXT NOT NULL,
    PRIMARY KEY (psi_id, pseudonym)
);
CREATE TABLE IF NOT EXISTS linkages (
    psi_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
"""


class LinkageExists(ValueError):
    """A PSI's table is written once: a second, different result for the same PSI is
    refused rather than silently mixed with the first."""


class Linkage:
    """The spoke's linking tables (SQLite, ``work_dir/linkage.sqlite``)."""

    FILE_NAME = "linkage.sqlite"

    def __init__(self, work_dir: Path) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        self.path = work_dir / self.FILE_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Linkage:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def save(self, psi_id: str, links: Mapping[str, str]) -> None:
        """Keep a PSI's table (pseudonym → local case id). Saving the same table again is a
        no-op (a redelivered result); a different one is refused."""
        with self._lock:
            if self.exists(psi_id):
                if self.load(psi_id) != dict(links):
                    raise LinkageExists(f"PSI {psi_id} already has a different linking table")
                return
            with self._db:
                self._db.execute("INSERT INTO linkages (psi_id) VALUES (?)", (psi_id,))
                self._db.executemany(
                    "INSERT INTO links (psi_id, pseudonym, case_id) VALUES (?, ?, ?)",
                    [(psi_id, p, c) for p, c in links.items()])

    def exists(self, psi_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM linkages WHERE psi_id = ?",
                                (psi_id,)).fetchone() is not None

    def load(self, psi_id: str) -> dict[str, str]:
        """The table of one PSI; empty when the PSI is unknown here."""
        return dict(self._db.execute(
            "SELECT pseudonym, case_id FROM links WHERE psi_id = ?", (psi_id,)))

    def cases(self, psi_id: str) -> list[tuple[str, str]]:
        """(pseudonym, case id) pairs sorted by pseudonym: the order every party of a
        vertical study uses for its rows."""
        return sorted(self.load(psi_id).items())

    def forget(self, psi_id: str) -> None:
        """Drop a PSI's table (its study ended, or the site withdrew)."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM links WHERE psi_id = ?", (psi_id,))
            self._db.execute("DELETE FROM linkages WHERE psi_id = ?", (psi_id,))
