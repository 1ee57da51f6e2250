"""The site's data steward: optional human gates before an experiment runs and before a
result is released (``[steward]`` in the spoke's config).

What waits for a decision is stored in the spoke's journal database (its own tables), so it
survives a restart, and the broker message is acknowledged once it is stored: nothing is
held hostage on the broker while a person decides. The steward decides with
``tributary spoke steward`` (another process, same database and audit log); the running
agent applies the decisions between messages.

A held result has not entered the custody chain yet: it is signed into the chain only
when it is released (or withheld), so the chain the hub checks stays gap-free whatever
order the steward decides in.
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

if TYPE_CHECKING:
    from tributary.spoke.agent import SpokeAgent

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


def withheld(result: ResultMessage, steward: str, reason: str | None) -> ResultMessage:
    """The result the hub receives for a rejected one: the case ran, its output stays at
    the site, and the failure says who withheld it and why."""
    detail = f"withheld by the site's data steward ({steward})"
    return result.model_copy(update={
        "status": CaseStatus.FAILED, "output": None, "released": {},
        "failure": Failure(reason=FailureReason.WITHHELD,
                           detail=f"{detail}: {reason}"[:2000] if reason else detail)})


class Steward:
    """The agent's side: hold what the policy gates, and apply the steward's decisions."""

    def __init__(self, agent: SpokeAgent) -> None:
        self.agent = agent
        self.policy = agent.config.steward
        self.desk = StewardDesk(agent.config.work_dir / "journal.db")

    def close(self) -> None:
        self.desk.close()

    # -- hooks ------------------------------------------------------------------------------
    def hold_experiment(self, message: ExperimentMessage, envelope: bytes | str) -> bool:
        """Hook before an experiment runs. True if it now waits for the steward (stored
        durably and reported to the hub as held); the caller may then acknowledge it."""
        if not self.policy.approve_experiments:
            return False
        from tributary.spoke.counts import matching_cases

        agent = self.agent
        try:
            size: int | None = len(matching_cases(agent.config, agent.pseudonyms,
                                                  message.cohort))
        except (OSError, ValueError):
            size = None
        releasable = agent.config.policy.releasable_attributes
        summary = {
            "algorithm": f"{message.algorithm.name} {message.algorithm.version}",
            "image": message.algorithm.reference, "digest": message.algorithm.digest,
            "arguments": message.arguments, "cohort": message.cohort.model_dump(mode="json"),
            "cohort_size": size, "release_requested": message.release,
            "release_allowed": [a for a in message.release if a in releasable],
            "limits": message.limits.model_dump(mode="json"),
            "expires_at": message.expires_at.isoformat() if message.expires_at else None,
        }
        text = envelope.decode() if isinstance(envelope, bytes) else envelope
        if self.desk.hold_experiment(message, text, summary):
            agent._audit("steward.experiment_held", message.experiment_id,
                         message_id=message.message_id, **summary)
        elif self.desk.experiment_state(message.experiment_id) != PENDING:
            return True  # redelivered after the steward decided: the decision stands
        agent._status(message, ExperimentState.HELD,
                      reason="awaiting approval by the site's data steward")
        return True

    def hold_result(self, result: ResultMessage, run: dict[str, Any]) -> bool:
        """Hook before a result is signed into the custody chain and published. True if
        the result now waits for the steward's review instead."""
        if not self.policy.review_results:
            return False
        self.desk.hold_result(result, run)
        self.agent._audit("steward.result_held", result.experiment_id, case=result.case_id,
                          status=result.status.value)
        return True

    def already_held(self, experiment_id: str, case_id: str) -> bool:
        """Hook before a case runs: a result held (or decided) for it is never re-run."""
        return self.desk.is_held(experiment_id, case_id)

    def waiting_results(self, experiment_id: str) -> int:
        """Results of the experiment not yet released or withheld."""
        return len(self.desk.results(PENDING, APPROVED, REJECTED, experiment_id=experiment_id))

    # -- applying decisions -----------------------------------------------------------------
    def apply_decisions(self) -> None:
        """Run approved experiments, refuse rejected ones, release or withhold reviewed
        results. Raises PublishError when the broker is away; the next call resumes."""
        from tributary.protocol.wire import open_from_hub

        agent = self.agent
        for held in self.desk.experiments(APPROVED, REJECTED):
            try:  # re-verify what was kept: the database is not trusted to be untouched
                message = open_from_hub(held.envelope, agent.hub_keys)
                if not isinstance(message, ExperimentMessage):
                    raise ProtocolError("the held message is not an experiment")
            except ProtocolError as exc:
                log.error("held experiment %s no longer verifies: %s", held.experiment_id, exc)
                agent._audit("steward.experiment_dropped", held.experiment_id, reason=str(exc))
                agent._send(ExperimentStatusMessage(
                    experiment_id=held.experiment_id, spoke_id=agent.config.spoke_id,
                    state=ExperimentState.REFUSED,
                    reason="the held experiment message no longer verifies at the spoke"))
                self.desk.experiment_done(held.experiment_id)
                continue
            if held.state == REJECTED:
                log.info("experiment %s rejected by the steward", held.experiment_id)
                agent._status(message, ExperimentState.REFUSED,
                              reason=f"rejected by the site's data steward ({held.decided_by})"
                                     + (f": {held.reason}" if held.reason else ""))
            else:
                log.info("experiment %s approved by the steward", held.experiment_id)
                agent.process(message)
            self.desk.experiment_done(held.experiment_id)
        decided = self.desk.results(APPROVED, REJECTED)
        for held_result in decided:
            result = held_result.result
            if held_result.state == REJECTED:
                result = withheld(result, held_result.decided_by or "steward", held_result.reason)
            if agent.journal.result(result.experiment_id, result.case_id,
                                    result.attempt) is None:
                agent._audit("steward.result_applied", result.experiment_id,
                             case=result.case_id, decision=held_result.state,
                             steward=held_result.decided_by, reason=held_result.reason)
                agent.chain.append_and_publish(result, held_result.run, agent._publish_result)
        for experiment_id in dict.fromkeys(h.result.experiment_id for h in decided):
            mine = [h for h in decided if h.result.experiment_id == experiment_id]
            if not self.desk.results(PENDING, experiment_id=experiment_id):
                # The last review of this experiment: everything out, then it is complete.
                agent.chain.flush(agent._publish_result)
                cases = [r.result.case_id for r in self.desk.results(
                    APPROVED, REJECTED, DONE, experiment_id=experiment_id)]
                agent._send(ExperimentStatusMessage(
                    experiment_id=experiment_id, spoke_id=agent.config.spoke_id,
                    state=ExperimentState.COMPLETED, case_ids=cases))
            for held_result in mine:
                self.desk.result_done(held_result.result)
