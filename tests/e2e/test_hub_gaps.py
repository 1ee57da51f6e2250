"""A result lost on the broker leaves a gap in its spoke's custody chain (issue 10, item 22).
The hub records the gap instead of refusing the spoke's later results for ever, takes the
chain up again when the spoke resends the missing records, never calls a target completed
while a case has no result, and lets an administrator accept a gap that cannot be filled.
The spoke resends from its journal. (The same, with a result really deleted from the
broker: tests/test_custody_gap_e2e.py.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from e2e_helpers import wait_for
from signed_results import DIGEST, Spokes, accept, add_experiment
from sqlmodel import Session, select
from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.hub.db import make_engine
from tributary.hub.models import (
    AuditEvent,
    CaseResult,
    CustodyGap,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    TargetState,
)
from tributary.hub.services import control, gaps
from tributary.hub.services.exports import custody_gaps
from tributary.hub.services.ingest import complete_if_settled, ingest
from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.destinations import spoke_queue
from tributary.protocol.messages import (
    CaseStatus,
    ExperimentStatusMessage,
    Failure,
    FailureReason,
    ResendRecordsMessage,
    ResultMessage,
)
from tributary.protocol.messages import ExperimentState as SpokeState
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import open_from_hub
from tributary.services.settings import ServiceSettings
from tributary.spoke.custody import CustodyChain
from tributary.spoke.journal import Journal


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[Session, Spokes]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    with Session(engine) as session:
        spokes = Spokes(session, ["site-a"])
        add_experiment(session, "exp-1", ["site-a"], "summary", {})
        accept(session, "exp-1", "site-a", ["c-1", "c-2", "c-3"])
        yield session, spokes


def result(case: str) -> ResultMessage:
    return ResultMessage(experiment_id="exp-1", spoke_id="site-a", case_id=case,
                         status=CaseStatus.SUCCEEDED, output={"ok": True},
                         image_digest=DIGEST, finished_at=datetime.now(UTC))


def spoke_done(session: Session) -> None:
    ingest(session, ExperimentStatusMessage(experiment_id="exp-1", spoke_id="site-a",
                                            state=SpokeState.COMPLETED))


def state(session: Session) -> tuple[str, str]:
    session.expire_all()
    return (session.get(Experiment, "exp-1").state.value,
            session.get(ExperimentTarget, ("exp-1", "site-a")).state.value)


def detect(session: Session, message: ResultMessage) -> CustodyGap:
    """What the results consumer does with a result that reveals a gap."""
    with pytest.raises(gaps.GapDetected) as caught:
        ingest(session, message)
    session.rollback()
    gap = gaps.record_gap(session, caught.value)
    session.commit()
    return gap


def test_a_lost_result_is_a_gap_filled_by_the_resend(hub: tuple[Session, Spokes]) -> None:
    session, spokes = hub
    first, second, third = (spokes.sign(result(c)) for c in ("c-1", "c-2", "c-3"))
    # `first` is lost on the broker; the later records reveal the gap, once.
    gap = detect(session, second)
    assert (gap.first_missing, gap.last_missing, gap.state) == (1, 1, "open")
    assert detect(session, third).id == gap.id
    spoke_done(session)
    assert state(session) == ("launched", "accepted"), "never completed with cases open"
    assert "missing" in session.get(ExperimentTarget, ("exp-1", "site-a")).reason
    # The spoke resends from its journal: the same messages, in chain order.
    for message in (first, second, third):
        assert ingest(session, message)
    assert state(session) == ("completed", "completed")
    session.refresh(gap)
    assert gap.state == "resolved"
    assert {r.state.value for r in session.exec(select(CaseResult))} == {"succeeded"}


def test_a_lost_last_result_is_noticed_when_the_spoke_is_done(
        hub: tuple[Session, Spokes]) -> None:
    session, spokes = hub
    first, second, third = (spokes.sign(result(c)) for c in ("c-1", "c-2", "c-3"))
    assert ingest(session, first) and ingest(session, second)
    spoke_done(session)  # `third` was lost: no later record can show the gap
    assert state(session) == ("launched", "accepted")
    [gap] = gaps.open_gaps(session, "site-a")
    assert (gap.first_missing, gap.last_missing) == (3, None)
    assert ingest(session, third)
    assert state(session) == ("completed", "completed")
    session.refresh(gap)
    assert gap.state == "resolved"


def test_an_administrator_accepts_a_gap_that_cannot_be_filled(
        hub: tuple[Session, Spokes]) -> None:
    session, spokes = hub
    _lost, second, third = (spokes.sign(result(c)) for c in ("c-1", "c-2", "c-3"))
    gap = detect(session, second)
    detect(session, third)
    spoke_done(session)
    with pytest.raises(gaps.NotAllowed):
        gaps.accept(session, gap.id + 1, "site-a", "root", "no such gap")
    accepted, experiments = gaps.accept(session, gap.id, "site-a", "root", "disk lost")
    for experiment_id in experiments:
        complete_if_settled(session, experiment_id)
    session.commit()
    assert accepted.state == "accepted" and experiments == ["exp-1"]
    assert state(session) == ("completed", "completed")  # every case settled, c-1..3 lost
    # The records after the gap, refused while it was open, are resent and count.
    assert ingest(session, second) and ingest(session, third)
    rows = {r.case_id: r for r in session.exec(select(CaseResult))}
    assert {c: r.state.value for c, r in rows.items()} == {
        "c-1": "failed", "c-2": "succeeded", "c-3": "succeeded"}
    assert rows["c-1"].failure["reason"] == gaps.LOST_IN_TRANSIT
    [event] = session.exec(select(AuditEvent).where(
        AuditEvent.action == "custody.gap_accepted")).all()
    assert event.actor == "root" and event.detail["reason"] == "disk lost"
    [exported] = custody_gaps(session, "exp-1")
    assert exported["accepted_by"] == "root" and exported["lost_cases"] == ["c-1"]
    with pytest.raises(gaps.NotAllowed):
        gaps.accept(session, gap.id, "site-a", "root", "twice")


def test_a_target_is_not_completed_by_the_spoke_alone(hub: tuple[Session, Spokes]) -> None:
    session, spokes = hub
    ingest(session, spokes.sign(result("c-1")))
    spoke_done(session)
    target = session.get(ExperimentTarget, ("exp-1", "site-a"))
    assert target.state == TargetState.ACCEPTED and target.spoke_completed_at is not None
    assert session.get(Experiment, "exp-1").state == ExperimentState.LAUNCHED


def test_the_spoke_resends_from_its_journal(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    chain = CustodyChain(journal, SigningKey.generate())
    signed = [chain.append(result(c), {}) for c in ("c-1", "c-2", "c-3")]
    for row in journal.outbox_pending():
        journal.mark_sent(row.seq)
    assert journal.outbox_pending() == []
    marked, orphans = journal.resend_from(2)
    assert (marked, orphans) == (2, [])
    pending = journal.outbox_pending()
    assert [r.message_id for r in pending] == [s.message_id for s in signed[1:]]
    assert journal.resend_from(9) == (0, [])



def test_a_retry_waits_for_the_spoke_again(hub: tuple[Session, Spokes],
                                           service_settings: ServiceSettings) -> None:
    """Cases run again are not missing results: no gap while the spoke works on them."""
    session, spokes = hub
    ingest(session, spokes.sign(result("c-1")))
    for case in ("c-2", "c-3"):
        failed = result(case).model_copy(update={
            "status": CaseStatus.FAILED, "output": None,
            "failure": Failure(reason=FailureReason.EXIT_CODE, detail="exit 1")})
        ingest(session, spokes.sign(failed))
    spoke_done(session)
    assert state(session) == ("completed", "completed")
    client = StompClient(BrokerSettings(host=service_settings.host,
                                        port=service_settings.broker_port,
                                        federation=f"t{uuid.uuid4().hex[:12]}"), "test").start(30)
    try:
        control.retry(session, client, SigningKey.generate(), session.get(Experiment, "exp-1"),
                      "root", None, None, "flaky", timedelta(minutes=5))
    finally:
        client.close()
    retried = result("c-2").model_copy(update={"attempt": 2})
    assert ingest(session, spokes.sign(retried))  # c-3 still runs at the spoke
    assert gaps.open_gaps(session, "site-a") == []
    assert state(session) == ("launched", "accepted")
    assert "missing" not in (session.get(ExperimentTarget, ("exp-1", "site-a")).reason or "")


def test_an_operator_accepts_a_gap_on_the_command_line(
        hub: tuple[Session, Spokes], tmp_path: Path, service_settings: ServiceSettings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    session, spokes = hub
    _lost, second = (spokes.sign(result(c)) for c in ("c-1", "c-2"))
    gap = detect(session, second)
    spoke_done(session)
    federation = f"t{uuid.uuid4().hex[:12]}"
    hub_key = SigningKey.generate()
    hub_key.save(tmp_path / "hub.key")
    for name, value in {"DATABASE_URL": f"sqlite:///{tmp_path / 'hub.db'}",
                        "SIGNING_KEY": str(tmp_path / "hub.key"),
                        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
                        "BROKER_HOST": service_settings.host,
                        "BROKER_PORT": str(service_settings.broker_port),
                        "BROKER_FEDERATION": federation}.items():
        monkeypatch.setenv(f"TRIBUTARY_HUB_{name}", value)
    listed = CliRunner().invoke(app, ["gaps", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "1..1" in listed.output and "open" in listed.output
    done = CliRunner().invoke(app, ["gaps", "accept", "site-a", str(gap.id), "--reason",
                                    "journal restored from backup"])
    assert done.exit_code == 0, done.output
    assert "resend its records from 2" in done.output
    session.expire_all()
    assert session.get(CustodyGap, gap.id).accepted_by.startswith("operator:")
    assert state(session) == ("completed", "completed")
    # The resend request really waits, signed by the hub, in the spoke's queue.
    received: list[str] = []
    client = StompClient(BrokerSettings(host=service_settings.host,
                                        port=service_settings.broker_port,
                                        federation=federation), "spoke").start(30)
    try:
        client.subscribe(spoke_queue("site-a", federation),
                         lambda d: (received.append(d.body.decode()), client.ack(d)))
        wait_for(lambda: received, 30, "the resend request")
    finally:
        client.close()
    message = open_from_hub(received[0], [hub_key.public])
    assert isinstance(message, ResendRecordsMessage) and message.from_sequence == 2
    again = CliRunner().invoke(app, ["gaps", "accept", "site-a", str(gap.id), "--reason", "x"])
    assert again.exit_code == 1 and "not open" in again.output
