"""Hub side of durability without a broker: liveness from heartbeats, case progress,
attempt history and idempotency per (experiment, spoke, case, attempt), cancellation and
refused retries as the spokes report them, and what each target is shown waiting for."""
# ruff: noqa: F811 - the fixtures ``keys`` and ``session`` are from signed_results

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from signed_results import Chain, keys, result, session  # noqa: F401 - fixtures
from sqlmodel import Session, select

from tributary.hub.models import (
    CaseAttempt,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Spoke,
    SpokeChain,
    TargetState,
)
from tributary.hub.services.ingest import ingest
from tributary.hub.services.liveness import is_online
from tributary.hub.services.progress import case_reads, target_progress
from tributary.protocol.messages import (
    CaseProgressMessage,
    CaseStartedMessage,
    CaseStatus,
    ExperimentStatusMessage,
    Failure,
    FailureReason,
    HeartbeatMessage,
    RunningCase,
)
from tributary.protocol.messages import ExperimentState as SpokeState


def heartbeat(sent_at: datetime, queue_depth: int = 3) -> HeartbeatMessage:
    return HeartbeatMessage(
        spoke_id="site-a", spoke_version="9.9", concurrency=2, queue_depth=queue_depth,
        interval_seconds=5, sent_at=sent_at,
        running=[RunningCase(experiment_id="exp-1", case_id="c-1", started_at=sent_at,
                             fraction=0.5)])


def test_heartbeats_make_a_spoke_online_and_the_newest_wins(session: Session) -> None:
    spoke = session.get(Spoke, "site-b")
    assert not is_online(spoke, 60)  # never heard from
    now = datetime.now(UTC)
    assert ingest(session, heartbeat(now, queue_depth=3))
    assert not ingest(session, heartbeat(now - timedelta(seconds=30), queue_depth=9))
    spoke = session.get(Spoke, "site-a")
    assert (spoke.spoke_version, spoke.concurrency, spoke.queue_depth) == ("9.9", 2, 3)
    assert spoke.running[0]["case_id"] == "c-1"
    assert is_online(spoke, 60)
    later = datetime.now(UTC) + timedelta(seconds=61)
    assert not is_online(spoke, 60, now=later)
    # three missed heartbeats of a slow spoke count, not the window alone
    spoke.heartbeat_interval_s = 40
    assert is_online(spoke, 60, now=later)
    progress = {t.spoke_id: t for t in target_progress(session, "exp-1", 60)}
    assert progress["site-a"].spoke_online
    assert "spoke site-a: 0 running, 3 queued" in progress["site-a"].waiting_for
    assert progress["site-b"].waiting_for == \
        "waiting in the broker for spoke site-b, offline since never"


def test_progress_is_shown_until_the_result_arrives(session: Session, keys: dict) -> None:
    ingest(session, CaseStartedMessage(experiment_id="exp-1", spoke_id="site-a",
                                       case_id="c-1"))
    assert ingest(session, CaseProgressMessage(experiment_id="exp-1", spoke_id="site-a",
                                               case_id="c-1", fraction=0.4, message="measuring"))
    read = {c.case_id: c for c in case_reads(session, "exp-1")}["c-1"]
    assert (read.state, read.progress_fraction, read.progress_message) == \
        ("running", 0.4, "measuring")
    assert ingest(session, Chain(keys["site-a"]).sign(result("c-1")))
    late = CaseProgressMessage(experiment_id="exp-1", spoke_id="site-a", case_id="c-1",
                               fraction=0.9)
    assert not ingest(session, late)
    assert {c.case_id: c for c in case_reads(session, "exp-1")}["c-1"].state == "succeeded"


def test_one_result_per_attempt_however_often_the_case_ran(session: Session,
                                                           keys: dict) -> None:
    chain = Chain(keys["site-a"])
    nodule = {"center_mm": [0, 0, 0], "diameter_mm": 10}
    assert ingest(session, chain.sign(result("c-1", [nodule], [nodule])))
    # the spoke ran the case again (a crash between run and journal) and signed a second
    # record: it continues the chain, but the first result of attempt 1 stays
    assert not ingest(session, chain.sign(result("c-1", [], [nodule])))
    assert session.get(SpokeChain, "site-a").sequence == 2
    assert ingest(session, chain.sign(result("c-2")))  # the chain goes on unbroken
    row = session.exec(select(CaseResult).where(CaseResult.case_id == "c-1")).one()
    assert row.output == {"findings": [nodule]}
    assert len(session.exec(select(CaseAttempt)).all()) == 2


def test_a_retried_case_keeps_every_attempt(session: Session, keys: dict) -> None:
    chain = Chain(keys["site-a"])
    failed = result("c-1").model_copy(update={
        "status": CaseStatus.FAILED, "output": None,
        "failure": Failure(reason=FailureReason.KILLED, detail="killed")})
    assert ingest(session, chain.sign(failed))
    row = session.exec(select(CaseResult).where(CaseResult.case_id == "c-1")).one()
    row.state, row.attempt = CaseState.QUEUED, 2  # what POST /retry does
    session.add(row)
    session.commit()
    assert ingest(session, CaseStartedMessage(experiment_id="exp-1", spoke_id="site-a",
                                              case_id="c-1", attempt=2))
    assert ingest(session, chain.sign(result("c-1").model_copy(update={"attempt": 2})))
    read = {c.case_id: c for c in case_reads(session, "exp-1")}["c-1"]
    assert (read.state, read.attempt) == ("succeeded", 2)
    assert [(a.attempt, a.state) for a in read.attempts] == [(1, "failed"), (2, "succeeded")]


def test_a_refused_retry_restores_the_latest_attempt(session: Session, keys: dict) -> None:
    chain = Chain(keys["site-a"])
    for case in ("c-1", "c-2", "c-3"):
        failed = result(case).model_copy(update={
            "status": CaseStatus.FAILED, "output": None,
            "failure": Failure(reason=FailureReason.EXIT_CODE, detail="exit 1")})
        ingest(session, chain.sign(failed))
    ingest(session, ExperimentStatusMessage(experiment_id="exp-1", spoke_id="site-a",
                                            state=SpokeState.COMPLETED))
    for row in session.exec(select(CaseResult)).all():
        row.state, row.attempt = CaseState.QUEUED, 2
        session.add(row)
    target = session.get(ExperimentTarget, ("exp-1", "site-a"))
    target.state = TargetState.ACCEPTED
    session.add(target)
    session.commit()
    assert ingest(session, ExperimentStatusMessage(
        experiment_id="exp-1", spoke_id="site-a", state=SpokeState.RETRY_REFUSED,
        case_ids=["c-1", "c-2", "c-3"], reason="input gone"))
    rows = session.exec(select(CaseResult)).all()
    assert {(r.state, r.attempt) for r in rows} == {(CaseState.FAILED, 1)}
    assert all("input gone" in r.note for r in rows)
    assert session.get(ExperimentTarget, ("exp-1", "site-a")).state == TargetState.COMPLETED


def test_a_confirmed_cancellation_settles_target_and_cases(session: Session) -> None:
    assert ingest(session, ExperimentStatusMessage(
        experiment_id="exp-1", spoke_id="site-a", state=SpokeState.CANCELLED,
        case_ids=["c-2", "c-3"], reason="wrong cohort"))
    assert ingest(session, ExperimentStatusMessage(
        experiment_id="exp-1", spoke_id="site-b", state=SpokeState.CANCELLED,
        reason="wrong cohort"))
    states = {r.case_id: r.state for r in session.exec(select(CaseResult)).all()}
    assert states == {"c-1": CaseState.QUEUED, "c-2": CaseState.CANCELLED,
                      "c-3": CaseState.CANCELLED}
    assert session.get(ExperimentTarget, ("exp-1", "site-a")).state == TargetState.CANCELLED
    assert session.get(Experiment, "exp-1").state == ExperimentState.COMPLETED
