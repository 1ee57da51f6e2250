"""The spoke's differencing check for federated counts (in the spirit of DataSHIELD's
disclosure controls): a requester whose two answered counts differ by fewer than k cases
has isolated those few cases, so such an answer is refused; and each requester has a query
budget, so refusals cannot be probed without end. The history of true counts lives only
here, in the spoke's work directory; the hub never sees it."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict

SCHEMA = """
CREATE TABLE IF NOT EXISTS count_history (
    requester TEXT NOT NULL,
    query_id TEXT NOT NULL,
    true_count INTEGER,          -- NULL when the request was refused
    asked_at TEXT NOT NULL,
    PRIMARY KEY (requester, query_id)
);
"""


class GuardDecision(BaseModel):
    """Whether a count may be answered; ``refused`` says why not."""

    model_config = ConfigDict(frozen=True)

    refused: str | None = None


class CountHistory:
    """Per-requester history of counts, in a small SQLite file of its own."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> CountHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def asked_since(self, requester: str, since: datetime) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM count_history WHERE requester=? AND asked_at>=?",
                (requester, since.isoformat())).fetchone()[0]

    def answered(self, requester: str) -> list[int]:
        """The true counts earlier answered to ``requester``."""
        with self._lock:
            return [row[0] for row in self._db.execute(
                "SELECT true_count FROM count_history WHERE requester=? AND true_count IS NOT "
                "NULL", (requester,))]

    def record(self, requester: str, query_id: str, true_count: int | None) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO count_history VALUES (?, ?, ?, ?)",
                             (requester, query_id, true_count,
                              datetime.now(UTC).isoformat()))


def check(history: CountHistory, requester: str, true_count: int, min_cell: int,
          budget: int, budget_days: int) -> GuardDecision:
    """May ``true_count`` be answered to ``requester``? Two answers differing by 1 to k - 1
    cases are a differencing pair unless both are small cells (then each is only "fewer
    than k"). Refusals count against the budget too."""
    since = datetime.now(UTC) - timedelta(days=budget_days)
    if history.asked_since(requester, since) >= budget:
        return GuardDecision(refused=f"query budget spent: {requester} may ask {budget} "
                                     f"counts in {budget_days} days")
    for earlier in history.answered(requester):
        difference = abs(true_count - earlier)
        if 0 < difference < min_cell and max(true_count, earlier) >= min_cell:
            return GuardDecision(refused=f"this count would differ from an earlier count "
                                         f"for {requester} by fewer than {min_cell} cases")
    return GuardDecision()
