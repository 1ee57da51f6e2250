"""The spoke journal's promises, on a real SQLite file: each case handed out once, crashes
put running cases back, cancellation and retries follow their rules, the outbox keeps
order and survives reopening."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tributary.protocol.messages import (
    AlgorithmRef,
    CaseStatus,
    CohortSelection,
    CountRequest,
    ExperimentMessage,
    Failure,
    FailureReason,
    ResultMessage,
)
from tributary.spoke.journal import (
    CANCELLED,
    DONE,
    QUEUED,
    Journal,
    Outgoing,
    WorkDirBusy,
    claim_work_dir,
)

DIGEST = "sha256:" + "ab" * 32


def experiment(experiment_id: str = "exp-1") -> ExperimentMessage:
    return ExperimentMessage(experiment_id=experiment_id, spoke_id="site-a", algorithm=AlgorithmRef(
        name="algo", version="1", repository="127.0.0.1:5000/algo", digest=DIGEST))


def result(case_id: str, attempt: int = 1, failed: bool = False) -> ResultMessage:
    return ResultMessage(
        experiment_id="exp-1", spoke_id="site-a", case_id=case_id, attempt=attempt,
        status=CaseStatus.FAILED if failed else CaseStatus.SUCCEEDED,
        failure=Failure(reason=FailureReason.KILLED, detail="killed") if failed else None)


def accepted(journal: Journal, cases: list[str]) -> None:
    journal.add_experiment(experiment())
    journal.settle_experiment("exp-1", "accepted", None, None, cases)


def test_each_queued_case_is_claimed_exactly_once(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    cases = [f"c-{i:016x}" for i in range(40)]
    accepted(journal, cases)
    claimed: list[str] = []

    def worker() -> None:
        while (row := journal.claim_next()) is not None:
            claimed.append(row.case_id)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == cases


def test_a_restart_requeues_running_cases_and_counts_launches(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    accepted(journal, ["c-1", "c-2"])
    first = journal.claim_next()
    assert first is not None and first.launches == 1
    journal.close()

    reopened = Journal(tmp_path / "journal.db")  # as after kill -9
    interrupted = reopened.requeue_interrupted()
    assert [r.case_id for r in interrupted] == ["c-1"]
    again = reopened.claim_next()
    assert again is not None and (again.case_id, again.launches) == ("c-1", 2)
    reopened.release_case(again)  # a graceful stop does not count as a launch
    assert reopened.claim_next().launches == 2  # type: ignore[union-attr]


def test_cancel_drops_queued_cases_and_is_remembered(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    assert journal.cancel("exp-0", "too early", "m-0") == []  # before its experiment
    assert journal.cancellation("exp-0") == "too early"
    accepted(journal, ["c-1", "c-2", "c-3"])
    running = journal.claim_next()
    assert running is not None
    assert journal.cancel("exp-1", "stop", "m-1") == ["c-2", "c-3"]
    assert [r.state for r in journal.cases("exp-1")] == ["running", CANCELLED, CANCELLED]
    assert journal.claim_next() is None
    assert journal.unfinished("exp-1") == 1


def test_retry_only_failed_finished_cases_with_a_higher_attempt(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    accepted(journal, ["c-ok", "c-bad", "c-run"])
    for _ in range(3):
        journal.claim_next()
    journal.record(result("c-ok"))
    journal.record(result("c-bad", failed=True))
    queued, refused = journal.add_retry("exp-1", ["c-ok", "c-bad", "c-run", "c-what"], 2)
    assert queued == ["c-bad"]
    assert set(refused) == {"c-ok", "c-run", "c-what"}
    assert "succeeded" in refused["c-ok"] and "running" in refused["c-run"]
    assert journal.add_retry("exp-1", ["c-bad"], 2) == ([], {})  # redelivered: no-op
    row = journal.claim_next()
    assert row is not None and (row.case_id, row.attempt) == ("c-bad", 2)
    journal.record(result("c-bad", attempt=2))
    assert [(r.case_id, r.attempt, r.state) for r in journal.cases("exp-1")][-1] == (
        "c-bad", 2, DONE)
    assert journal.queue_depth() == 0 and QUEUED == "queued"


def test_outbox_keeps_order_across_reopening(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    for index in range(5):
        journal.send_later(Outgoing(f"m-{index}", "result", f"body-{index}", {"i": index}))
    journal.send_later(Outgoing("m-0", "result", "body-0", {}))  # same id: kept once
    journal.mark_sent(journal.outbox_pending()[0].seq)
    journal.close()
    reopened = Journal(tmp_path / "journal.db")
    assert [r.message_id for r in reopened.outbox_pending()] == ["m-1", "m-2", "m-3", "m-4"]
    assert reopened.outbox_depth() == 4


def test_a_count_request_is_answered_exactly_once_across_restarts(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    first = CountRequest(query_id="q-1", spoke_id="site-a",
                         selection=CohortSelection(modality="CT"))
    second = CountRequest(query_id="q-2", spoke_id="site-a")
    assert journal.add_count_request(first) and journal.add_count_request(second)
    assert not journal.add_count_request(first)  # redelivered while waiting: dropped
    journal.close()
    reopened = Journal(tmp_path / "journal.db")  # a crash before the answer: still there
    waiting = reopened.count_requests()
    assert [r.query_id for r in waiting] == ["q-1", "q-2"]
    assert waiting[0] == first
    assert reopened.status().count_requests == 2
    reopened.answer_count(first, Outgoing("reply-1", "count_reply", "{}", {}))
    assert [r.query_id for r in reopened.count_requests()] == ["q-2"]
    assert reopened.handled(first.message_id) and reopened.outbox_depth() == 1
    assert not reopened.add_count_request(first)  # redelivered after its answer: dropped


def test_one_spoke_process_per_work_folder(tmp_path: Path) -> None:
    import os

    fd = claim_work_dir(tmp_path)
    with pytest.raises(WorkDirBusy, match=f"pid {os.getpid()}"):
        claim_work_dir(tmp_path)
    os.close(fd)  # as when the first process dies
    os.close(claim_work_dir(tmp_path))
