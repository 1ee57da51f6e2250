"""The site's data steward: optional human gates before an experiment runs and before a
result is released (``[steward]`` in the spoke's config).

What waits for a decision is stored in the spoke's journal database (its own tables, beside
the journal's), so it survives a restart, and the broker message is acknowledged once it is
stored: nothing is held hostage on the broker while a person decides. A held experiment is
journaled in state ``held`` with its ``held`` status queued in the outbox; the case whose
result waits for review is ``held`` in the journal, so it is neither run again nor counted
as finished. The steward decides with ``tributary spoke steward`` (another process, same
database and audit log); the running agent applies the decisions between messages.

A held result has not entered the custody chain or the outbox yet: it is signed into the
chain, and queued for the hub, only when it is released (or withheld, as a failed result
with reason ``withheld``), so the chain the hub checks stays gap-free whatever order the
steward decides in. When the hub cancels an experiment, what still waits for the steward
is discarded: nothing of a cancelled experiment leaves unreviewed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tributary.protocol.messages import (
    CaseStatus,
    ExperimentMessage,
    ExperimentState,
    ExperimentStatusMessage,
    Failure,
    FailureReason,
    ProtocolError,
    ResultMessage,
)
from tributary.protocol.wire import open_from_hub
from tributary.spoke import journal as states

if TYPE_CHECKING:
    from tributary.protocol.signing import PublicKey
    from tributary.spoke.config import SpokeConfig
    from tributary.spoke.custody import CustodyChain
    from tributary.spoke.lifecycle import Lifecycle

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS steward_experiments (
    experiment_id TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    envelope TEXT NOT NULL,
    summary TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    decided_by TEXT,
    reason TEXT,
    held_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    decided_at TEXT
);
CREATE TABLE IF NOT EXISTS steward_results (
    experiment_id TEXT NOT NULL,
    case_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    message TEXT NOT NULL,
    run TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    decided_by TEXT,
    reason TEXT,
    held_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    decided_at TEXT,
    PRIMARY KEY (experiment_id, case_id, attempt)
);
"""

# Item states: pending -> approved | rejected (the steward) -> done (the agent applied it).
PENDING, APPROVED, REJECTED, DONE = "pending", "approved", "rejected", "done"


class NotPending(LookupError):
    """Nothing with that identity waits for a decision."""


@dataclass
class HeldExperiment:
    experiment_id: str
    envelope: str
    summary: dict[str, Any]
    state: str
    decided_by: str | None
    reason: str | None
    held_at: str


@dataclass
class HeldResult:
    result: ResultMessage
    run: dict[str, Any]
    state: str
    decided_by: str | None
    reason: str | None
    held_at: str


class StewardDesk:
    """What waits for the steward, in the spoke's journal database. Used by both the
    agent (to hold and apply) and the CLI (to list and decide)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    # -- experiments ------------------------------------------------------------------------
    def hold_experiment(self, message: ExperimentMessage, envelope: str,
                        summary: dict[str, Any]) -> bool:
        """Store the signed experiment; False if it was already held."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO steward_experiments (experiment_id, message_id, "
                "envelope, summary) VALUES (?, ?, ?, ?)",
                (message.experiment_id, message.message_id, envelope, json.dumps(summary)))
        return cursor.rowcount == 1

    def experiments(self, *states: str) -> list[HeldExperiment]:
        with self._lock:
            rows = self._db.execute(
                "SELECT experiment_id, envelope, summary, state, decided_by, reason, held_at "
                f"FROM steward_experiments WHERE state IN ({','.join('?' * len(states))}) "
                "ORDER BY held_at, experiment_id", states).fetchall()
        return [HeldExperiment(r[0], r[1], json.loads(r[2]), *r[3:]) for r in rows]

    def experiment_state(self, experiment_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM steward_experiments WHERE experiment_id=?",
                                   (experiment_id,)).fetchone()
        return row[0] if row else None

    def decide_experiment(self, experiment_id: str, approve: bool, steward: str,
                          reason: str | None) -> None:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE steward_experiments SET state=?, decided_by=?, reason=?, "
                "decided_at=CURRENT_TIMESTAMP WHERE experiment_id=? AND state=?",
                (APPROVED if approve else REJECTED, steward, reason, experiment_id, PENDING))
        if cursor.rowcount != 1:
            raise NotPending(f"no experiment {experiment_id!r} waits for a decision")

    def experiment_done(self, experiment_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE steward_experiments SET state=? WHERE experiment_id=?",
                             (DONE, experiment_id))

    # -- results ----------------------------------------------------------------------------
    def hold_result(self, result: ResultMessage, run: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO steward_results (experiment_id, case_id, attempt, "
                "message, run) VALUES (?, ?, ?, ?, ?)",
                (result.experiment_id, result.case_id, result.attempt,
                 result.model_dump_json(), json.dumps(run)))

    def is_held(self, experiment_id: str, case_id: str, attempt: int = 1) -> bool:
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM steward_results WHERE experiment_id=? AND case_id=? "
                "AND attempt=?", (experiment_id, case_id, attempt)).fetchone() is not None

    def results(self, *states: str, experiment_id: str | None = None) -> list[HeldResult]:
        query = ("SELECT message, run, state, decided_by, reason, held_at FROM steward_results "
                 f"WHERE state IN ({','.join('?' * len(states))})")
        params: list[Any] = list(states)
        if experiment_id is not None:
            query += " AND experiment_id=?"
            params.append(experiment_id)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY held_at, case_id", params).fetchall()
        return [HeldResult(ResultMessage.model_validate_json(r[0]), json.loads(r[1]), *r[2:])
                for r in rows]

    def decide_result(self, experiment_id: str, case_id: str, approve: bool, steward: str,
                      reason: str | None) -> None:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE steward_results SET state=?, decided_by=?, reason=?, "
                "decided_at=CURRENT_TIMESTAMP WHERE experiment_id=? AND case_id=? AND state=?",
                (APPROVED if approve else REJECTED, steward, reason, experiment_id, case_id,
                 PENDING))
        if cursor.rowcount == 0:
            raise NotPending(f"no result of case {case_id!r} in experiment {experiment_id!r} "
                             "waits for a decision")

    def result_done(self, result: ResultMessage) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE steward_results SET state=? WHERE experiment_id=? AND case_id=? "
                "AND attempt=?", (DONE, result.experiment_id, result.case_id, result.attempt))

    def discard(self, experiment_id: str, reason: str) -> int:
        """The experiment was cancelled: nothing of it waits for a decision any more.
        Returns how many items were discarded."""
        with self._lock:
            discarded = 0
            for table in ("steward_experiments", "steward_results"):
                discarded += self._db.execute(
                    f"UPDATE {table} SET state=?, reason=COALESCE(reason, ?), "
                    "decided_at=COALESCE(decided_at, CURRENT_TIMESTAMP) "
                    "WHERE experiment_id=? AND state<>?",
                    (DONE, reason, experiment_id, DONE)).rowcount
        return discarded


def withheld(result: ResultMessage, steward: str, reason: str | None) -> ResultMessage:
    """The result the hub receives for a rejected one: the case ran, its output stays at
    the site, and the failure says who withheld it and why."""
    detail = f"withheld by the site's data steward ({steward})"
    return result.model_copy(update={
        "status": CaseStatus.FAILED, "output": None, "released": {},
        "failure": Failure(reason=FailureReason.WITHHELD,
                           detail=f"{detail}: {reason}"[:2000] if reason else detail)})


class Steward:
    """The agent's side: hold what the policy gates, and apply the steward's decisions
    through the experiments' lifecycle (journal states and outbox), like everything else
    the spoke promises."""

    def __init__(self, config: SpokeConfig, lifecycle: Lifecycle, desk: StewardDesk,
                 chain: CustodyChain, hub_keys: list[PublicKey]) -> None:
        self.config = config
        self.policy = config.steward
        self.lifecycle = lifecycle
        self.desk = desk
        self.chain = chain
        self.hub_keys = hub_keys

    # -- hooks ------------------------------------------------------------------------------
    def hold_experiment(self, message: ExperimentMessage, envelope: bytes | str) -> bool:
        """Hook when a new experiment arrives. True if it now waits for the steward: its
        signed envelope is kept for re-verification, and it is journaled as ``held``
        together with the ``held`` status for the hub; the caller may then acknowledge it."""
        if not self.policy.approve_experiments:
            return False
        # Here, not at the top: the steward's CLI reads the desk without the catalog's imports.
        from tributary.spoke.counts import matching_cases

        lifecycle = self.lifecycle
        try:
            size: int | None = matching_cases(self.config, message.cohort, lifecycle.audit,
                                              message.experiment_id)
        except (OSError, ValueError, sqlite3.Error):  # incl. SelectionRefused: shown as unknown
            size = None
        releasable = self.config.policy.releasable_attributes
        summary = {
            "algorithm": f"{message.algorithm.name} {message.algorithm.version}",
            "image": message.algorithm.reference, "digest": message.algorithm.digest,
            "arguments": message.arguments, "cohort": message.cohort.model_dump(mode="json"),
            "cohort_size": size, "release_requested": message.release,
            "release_allowed": [a for a in message.release if a in releasable],
            "limits": message.limits.model_dump(mode="json"),
            "expires_at": message.expires_at.isoformat() if message.expires_at else None,
            # The data access request the hub held the study to, for the steward to weigh.
            "access_request": message.access_request.model_dump(mode="json")
            if message.access_request else None,
        }
        text = envelope.decode() if isinstance(envelope, bytes) else envelope
        if self.desk.hold_experiment(message, text, summary):
            lifecycle.audit("steward.experiment_held", message.experiment_id,
                            message_id=message.message_id, **summary)
        reason = "awaiting approval by the site's data steward"
        lifecycle.journal.add_experiment(message, states.HELD, reason, lifecycle.outgoing(
            ExperimentStatusMessage(experiment_id=message.experiment_id,
                                    spoke_id=self.config.spoke_id,
                                    state=ExperimentState.HELD, reason=reason)))
        return True

    def hold_result(self, result: ResultMessage, run: dict[str, Any]) -> bool:
        """Hook before a result is signed into the custody chain and queued for the hub.
        True if the result now waits for the steward's review instead (the caller marks
        its case ``held``)."""
        if not self.policy.review_results:
            return False
        self.desk.hold_result(result, run)
        self.lifecycle.audit("steward.result_held", result.experiment_id,
                             case=result.case_id, attempt=result.attempt,
                             status=result.status.value)
        return True

    def already_held(self, experiment_id: str, case_id: str, attempt: int) -> bool:
        """Hook before a case runs: a result held (or decided) for it is never re-run (the
        spoke may have stopped between holding it and marking its case)."""
        return self.desk.is_held(experiment_id, case_id, attempt)

    # -- applying decisions -----------------------------------------------------------------
    def apply_decisions(self) -> None:
        """Release approved experiments to the dispatcher, refuse rejected ones, sign
        reviewed results into the custody chain (withheld ones as failed) and queue them
        for the hub. Every step is a journal transaction, so a crash part-way resumes
        at the next call without sending anything twice."""
        for held in self.desk.experiments(APPROVED, REJECTED):
            self._apply_experiment(held)
        touched: dict[str, None] = {}
        for held_result in self.desk.results(APPROVED, REJECTED):
            self._apply_result(held_result)
            touched[held_result.result.experiment_id] = None
        for experiment_id in touched:
            self.lifecycle.maybe_finish(experiment_id)  # the last review completes it
        if touched:
            self.lifecycle.wake_outbox()

    def _apply_experiment(self, held: HeldExperiment) -> None:
        lifecycle = self.lifecycle
        experiment_id = held.experiment_id
        known = lifecycle.journal.experiment(experiment_id)
        if known is not None and known[1] != states.HELD:
            self.desk.experiment_done(experiment_id)  # cancelled while it waited
            return
        try:  # re-verify what was kept: the database is not trusted to be untouched
            message = open_from_hub(held.envelope, self.hub_keys)
            if not isinstance(message, ExperimentMessage):
                raise ProtocolError("the held message is not an experiment")
            if (message.experiment_id, message.spoke_id) != (experiment_id,
                                                             self.config.spoke_id):
                raise ProtocolError("the held message is another experiment's")
        except ProtocolError as exc:
            log.error("held experiment %s no longer verifies: %s", experiment_id, exc)
            lifecycle.audit("steward.experiment_dropped", experiment_id, reason=str(exc))
            reason = "the held experiment message no longer verifies at the spoke"
            if known is None:
                lifecycle.send_later(ExperimentStatusMessage(
                    experiment_id=experiment_id, spoke_id=self.config.spoke_id,
                    state=ExperimentState.REFUSED, reason=reason))
            else:
                lifecycle.settle(experiment_id, states.REFUSED, ExperimentState.REFUSED,
                                 reason=reason, expect=states.HELD)
            self.desk.experiment_done(experiment_id)
            return
        if known is None:  # held by a spoke version that did not journal held experiments
            lifecycle.journal.add_experiment(message, states.HELD)
        if held.state == REJECTED:
            log.info("experiment %s rejected by the steward", experiment_id)
            lifecycle.settle(experiment_id, states.REFUSED, ExperimentState.REFUSED,
                             reason=f"rejected by the site's data steward ({held.decided_by})"
                                    + (f": {held.reason}" if held.reason else ""),
                             expect=states.HELD)
        elif lifecycle.journal.release_held(experiment_id, message):
            log.info("experiment %s approved by the steward", experiment_id)
            lifecycle.audit("steward.experiment_released", experiment_id,
                            steward=held.decided_by)
            lifecycle.wake()
        self.desk.experiment_done(experiment_id)

    def _apply_result(self, held: HeldResult) -> None:
        lifecycle = self.lifecycle
        result = held.result
        cancelled = lifecycle.journal.cancellation(result.experiment_id)
        if cancelled is not None:
            lifecycle.journal.cancel(result.experiment_id, cancelled, "")
            lifecycle.discard_held(result.experiment_id,
                                   f"the hub cancelled the experiment: {cancelled}")
            return
        if held.state == REJECTED:
            result = withheld(result, held.decided_by or "steward", held.reason)
        if lifecycle.journal.result(result.experiment_id, result.case_id,
                                    result.attempt) is None:
            lifecycle.audit("steward.result_applied", result.experiment_id,
                            case=result.case_id, attempt=result.attempt, decision=held.state,
                            steward=held.decided_by, reason=held.reason)
            self.chain.append(result, held.run)
        self.desk.result_done(held.result)
