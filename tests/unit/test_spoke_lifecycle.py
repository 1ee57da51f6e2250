"""The spoke's experiment lifecycle, on a real journal, audit log and steward desk: a state
change and the signed status that tells the hub happen together (or not at all), every
audit entry lands in the hash-chained log, wake-ups reach the dispatcher and the outbox,
and an experiment finishes once, completed or cancelled, with what waited for the steward
discarded."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tributary.protocol.auditlog import AuditLog, read_entries, verify_log
from tributary.protocol.messages import (
    AlgorithmRef,
    CaseStatus,
    ExperimentMessage,
    ExperimentState,
    ExperimentStatusMessage,
    ResultMessage,
)
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import open_from_spoke
from tributary.spoke import journal as states
from tributary.spoke.journal import Journal
from tributary.spoke.lifecycle import Lifecycle
from tributary.spoke.steward import DONE, PENDING, StewardDesk

SPOKE = "site-a"
DIGEST = "sha256:" + "cd" * 32


class Spoke:
    """A lifecycle over real files in one work folder, and what it should have touched."""

    def __init__(self, work_dir: Path) -> None:
        self.key = SigningKey.generate()
        self.journal = Journal(work_dir / "journal.db")
        self.audit_path = work_dir / "audit.jsonl"
        self.desk = StewardDesk(work_dir / "journal.db")
        self.outbox_woken = threading.Event()
        self.lifecycle = Lifecycle(SPOKE, self.journal, AuditLog(self.audit_path), self.key,
                                   self.desk, self.outbox_woken.set)

    def statuses(self) -> list[ExperimentStatusMessage]:
        """The status messages waiting in the outbox, verified with the spoke's key."""
        found = []
        for row in self.journal.outbox_pending():
            message, _ = open_from_spoke(row.body, lambda _: (SPOKE, self.key.public))
            assert isinstance(message, ExperimentStatusMessage)
            found.append(message)
        return found

    def actions(self) -> list[tuple[str, str, str]]:
        return [(e["actor"], e["action"], e["target"]) for _, e in read_entries(self.audit_path)
                if e is not None]

    def close(self) -> None:
        self.desk.close()
        self.journal.close()


@pytest.fixture
def spoke(tmp_path: Path) -> Iterator[Spoke]:
    made = Spoke(tmp_path)
    yield made
    made.close()


def experiment(experiment_id: str = "exp-1") -> ExperimentMessage:
    return ExperimentMessage(experiment_id=experiment_id, spoke_id=SPOKE, algorithm=AlgorithmRef(
        name="algo", version="1", repository="127.0.0.1:5000/algo", digest=DIGEST))


def accept(spoke: Spoke, cases: list[str]) -> None:
    spoke.journal.add_experiment(experiment())
    assert spoke.lifecycle.settle("exp-1", states.ACCEPTED, ExperimentState.ACCEPTED, cases,
                                  queue=cases, expect=states.RECEIVED)


def result(case_id: str) -> ResultMessage:
    return ResultMessage(experiment_id="exp-1", spoke_id=SPOKE, case_id=case_id, attempt=1,
                         status=CaseStatus.SUCCEEDED, output={"ok": True})


def test_settle_moves_the_state_and_queues_the_signed_status_together(spoke: Spoke) -> None:
    spoke.journal.add_experiment(experiment())
    assert spoke.lifecycle.settle("exp-1", states.ACCEPTED, ExperimentState.ACCEPTED,
                                  ["c-1", "c-2"], queue=["c-1", "c-2"], expect=states.RECEIVED)
    assert spoke.journal.experiment("exp-1")[1] == states.ACCEPTED  # type: ignore[index]
    assert [r.case_id for r in spoke.journal.cases("exp-1")] == ["c-1", "c-2"]
    [status] = spoke.statuses()
    assert (status.experiment_id, status.state, status.case_ids) == (
        "exp-1", ExperimentState.ACCEPTED, ["c-1", "c-2"])
    assert spoke.outbox_woken.is_set()


def test_settle_from_a_state_the_experiment_has_left_changes_nothing(spoke: Spoke) -> None:
    accept(spoke, ["c-1"])
    assert not spoke.lifecycle.settle("exp-1", states.REFUSED, ExperimentState.REFUSED,
                                      reason="too late", expect=states.RECEIVED)
    assert spoke.journal.experiment("exp-1")[1] == states.ACCEPTED  # type: ignore[index]
    assert [s.state for s in spoke.statuses()] == [ExperimentState.ACCEPTED]


def test_audit_entries_are_chained_and_name_the_spoke_unless_told(spoke: Spoke) -> None:
    spoke.lifecycle.audit("spoke.started", SPOKE, version="test")
    spoke.lifecycle.audit("message.dropped", "q-1", actor="hub", reason="replay")
    assert spoke.actions() == [(SPOKE, "spoke.started", SPOKE), ("hub", "message.dropped", "q-1")]
    assert verify_log(spoke.audit_path).ok
    head = spoke.lifecycle.audit_head()
    assert head is not None and head.seq == 2


def test_wake_reaches_the_dispatcher_once(spoke: Spoke) -> None:
    assert not spoke.lifecycle.wait_for_work(0.0)
    spoke.lifecycle.wake()
    assert spoke.lifecycle.wait_for_work(0.0)
    assert not spoke.lifecycle.wait_for_work(0.0)  # consumed by that wait


def test_an_experiment_completes_once_its_last_case_is_done(spoke: Spoke) -> None:
    finished: list[str] = []
    spoke.lifecycle.on_finished(finished.append)
    accept(spoke, ["c-1", "c-2"])
    for _ in range(2):
        spoke.journal.claim_next()
    spoke.journal.record(result("c-1"))
    spoke.lifecycle.maybe_finish("exp-1")
    assert spoke.journal.experiment("exp-1")[1] == states.ACCEPTED  # type: ignore[index]
    spoke.journal.record(result("c-2"))
    spoke.lifecycle.maybe_finish("exp-1")
    spoke.lifecycle.maybe_finish("exp-1")  # a second call (another worker) sends nothing
    assert spoke.journal.experiment("exp-1")[1] == states.COMPLETED  # type: ignore[index]
    statuses = spoke.statuses()
    assert [s.state for s in statuses] == [ExperimentState.ACCEPTED, ExperimentState.COMPLETED]
    assert statuses[-1].case_ids == ["c-1", "c-2"]
    assert finished == ["exp-1"]


def test_results_held_for_review_are_announced_once_and_finish_nothing(spoke: Spoke) -> None:
    finished: list[str] = []
    spoke.lifecycle.on_finished(finished.append)
    accept(spoke, ["c-1"])
    row = spoke.journal.claim_next()
    assert row is not None
    spoke.journal.hold_case(row)
    spoke.lifecycle.maybe_finish("exp-1")
    spoke.lifecycle.maybe_finish("exp-1")
    assert spoke.journal.experiment("exp-1")[1] == states.REVIEWING  # type: ignore[index]
    assert [s.state for s in spoke.statuses()] == [ExperimentState.ACCEPTED,
                                                   ExperimentState.HELD]
    assert finished == []


def test_a_cancelled_experiment_ends_cancelled_and_its_held_results_are_discarded(
        spoke: Spoke) -> None:
    finished: list[str] = []
    spoke.lifecycle.on_finished(finished.append)
    accept(spoke, ["c-1", "c-2"])
    running = spoke.journal.claim_next()
    assert running is not None
    spoke.journal.cancel("exp-1", "no longer needed", "m-cancel")  # c-2 dropped
    spoke.desk.hold_result(result("c-1"), {})  # held after the cancellation was processed
    spoke.journal.hold_case(running)
    spoke.lifecycle.maybe_finish("exp-1")
    assert spoke.journal.experiment("exp-1")[1] == states.CANCELLED  # type: ignore[index]
    status = spoke.statuses()[-1]
    assert (status.state, status.case_ids, status.reason) == (
        ExperimentState.CANCELLED, ["c-1", "c-2"], "no longer needed")
    assert spoke.desk.results(PENDING) == []
    assert [h.result.case_id for h in spoke.desk.results(DONE)] == ["c-1"]
    assert (SPOKE, "steward.discarded", "exp-1") in spoke.actions()
    assert finished == ["exp-1"]
