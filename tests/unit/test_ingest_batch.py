"""Results stored in batches, one transaction each (``ingest_batch``): a batch behaves as
its messages applied one after the other. The chain check sees the batch's earlier records,
a refused message changes nothing and takes nothing else down, every message has its audit
row and forensic line (written together, with one fsync), and a batch that fails rolls back
whole, writing no line."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from signed_results import DIGEST, Spokes, accept, add_experiment, audited_hub, study_of
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from tributary.hub.models import (
    AuditEvent,
    CaseAttempt,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    InboundMessage,
    Spoke,
    SpokeChain,
    SpokeKey,
)
from tributary.hub.services.gaps import GapDetected
from tributary.hub.services.ingest import Rejected, ingest_batch
from tributary.protocol.auditlog import AuditLogError, verify_log
from tributary.protocol.messages import (
    CaseProgressMessage,
    CaseStartedMessage,
    CaseStatus,
    ExperimentStatusMessage,
    Failure,
    FailureReason,
    ResultMessage,
)
from tributary.protocol.messages import ExperimentState as SpokeState

CASES = [f"c{i}" for i in range(6)]


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return audited_hub(tmp_path)


@pytest.fixture
def spokes(engine: Engine) -> Spokes:
    return study_of(engine, ["north", "south", "west"], ["north", "south"], CASES)


def result(spoke: str, case: str, volume: float = 1.0) -> ResultMessage:
    return ResultMessage(experiment_id="exp", spoke_id=spoke, case_id=case,
                         status=CaseStatus.SUCCEEDED, output={"volume": volume},
                         image_digest=DIGEST, finished_at=datetime.now(UTC))


def count(engine: Engine, model: type) -> int:
    with Session(engine) as session:
        return session.exec(select(func.count()).select_from(model)).one()


def test_a_batch_applies_chains_in_order_and_refuses_only_what_is_wrong(
        engine: Engine, spokes: Spokes, tmp_path: Path) -> None:
    north = [spokes.sign(result("north", c)) for c in CASES[:4]]
    south = [spokes.sign(result("south", c)) for c in CASES[:2]]
    forged = north[0].model_copy(update={"case_id": "c5", "message_id": "forged-1"})
    untargeted = spokes.sign(result("west", "c0"))
    spokes.sign(result("south", "c2"))  # record 3 of south: lost on the way
    after_gap = spokes.sign(result("south", "c3"))
    lines_before = verify_log(tmp_path / "audit.jsonl").entries
    batch = [north[0], south[0], north[1], forged, untargeted, south[1], north[2], north[3],
             north[1], after_gap]  # north[1] twice: a redelivery inside the batch
    with Session(engine) as session:
        outcomes = ingest_batch(session, batch)

    assert outcomes[:3] == [True, True, True]
    assert isinstance(outcomes[3], Rejected) and "custody record refused" in str(outcomes[3])
    assert isinstance(outcomes[4], Rejected) and "does not target" in str(outcomes[4])
    assert outcomes[5:8] == [True, True, True]
    assert outcomes[8] is False  # the redelivered copy: a duplicate, no effect
    assert isinstance(outcomes[9], GapDetected) and outcomes[9].first_missing == 3
    with Session(engine) as session:
        stored = session.exec(select(CaseResult).where(
            CaseResult.state == CaseState.SUCCEEDED)).all()
        assert sorted((r.spoke_id, r.case_id) for r in stored) == sorted(
            [("north", c) for c in CASES[:4]] + [("south", c) for c in CASES[:2]])
        chains = {c.spoke_id: (c.sequence, c.record_sha256)
                  for c in session.exec(select(SpokeChain))}
        assert chains["north"] == spokes.heads["north"]
        assert chains["south"][0] == 2
        # Nothing of the refused messages: no message id, no attempt.
        inbound = set(session.exec(select(InboundMessage.message_id)))
        assert not {"forged-1", untargeted.message_id, after_gap.message_id} & inbound
        assert session.exec(select(func.count()).select_from(CaseAttempt)).one() == 6
        events = session.exec(select(AuditEvent).where(
            AuditEvent.action.in_(["message.received", "message.duplicate"]))).all()  # type: ignore[attr-defined]
        results = [e for e in events if e.detail.get("kind") == "result"]
        assert len(results) == 7  # six accepted, one duplicate
        assert all(e.log_seq is not None and e.log_hash for e in results)
    # One forensic line per audit row, in one chain that verifies.
    report = verify_log(tmp_path / "audit.jsonl")
    assert report.ok
    assert report.entries - lines_before == 7


def test_a_batch_that_fails_writes_nothing_not_even_its_audit_lines(
        engine: Engine, spokes: Spokes, tmp_path: Path) -> None:
    good = spokes.sign(result("north", "c0"))
    log_path = tmp_path / "audit.jsonl"
    intact = log_path.read_bytes()
    with log_path.open("ab") as handle:  # a torn last line: the log refuses to be extended
        handle.write(b'{"seq": 99')
    with Session(engine) as session, pytest.raises(AuditLogError):
        ingest_batch(session, [good])
    assert count(engine, CaseAttempt) == 0 and count(engine, InboundMessage) == 2
    assert log_path.read_bytes().startswith(intact)
    log_path.write_bytes(intact)
    with Session(engine) as session:  # the same message again, the log repaired: stored
        assert ingest_batch(session, [good]) == [True]
    assert count(engine, CaseAttempt) == 1
    assert verify_log(log_path).ok


def test_completion_and_settling_happen_once_per_batch(engine: Engine, spokes: Spokes) -> None:
    messages: list = []
    for spoke in ("north", "south"):
        messages += [spokes.sign(result(spoke, c, float(i))) for i, c in enumerate(CASES)]
        messages.append(ExperimentStatusMessage(experiment_id="exp", spoke_id=spoke,
                                                state=SpokeState.COMPLETED))
    with Session(engine) as session:
        assert all(o is True for o in ingest_batch(session, messages))
    with Session(engine) as session:
        experiment = session.get(Experiment, "exp")
        assert experiment is not None and experiment.state == ExperimentState.COMPLETED
        completed = session.exec(select(AuditEvent).where(
            AuditEvent.action == "experiment.completed")).all()
        assert len(completed) == 1


def _case_columns(engine: Engine) -> dict[str, tuple[object, ...]]:
    with Session(engine) as session:
        return {row.case_id: (row.state, row.attempt, row.output, row.failure,
                              row.custody_sha256, row.result_message_id, row.started_at,
                              row.progress_fraction, row.note)
                for row in session.exec(select(CaseResult).where(
                    CaseResult.spoke_id == "north"))}


def test_start_reports_and_results_of_one_case_in_one_batch_keep_their_order(
        engine: Engine, spokes: Spokes, tmp_path: Path) -> None:
    """A batch stores results with one UPDATE for all of them, apart from the ORM's changes
    (start and progress reports): the rows must end as if each message had been stored in a
    transaction of its own, whatever the order of the two kinds within the batch."""
    (tmp_path / "alone").mkdir()
    alone = audited_hub(tmp_path / "alone")
    with Session(alone) as session:
        for spoke, key in spokes.keys.items():
            session.add(Spoke(id=spoke, name=spoke))
            session.flush()
            session.add(SpokeKey(keyid=key.keyid, spoke_id=spoke, public_key_pem=key.public.pem))
        session.commit()
        add_experiment(session, "exp", ["north", "south"], "summary", {})
        accept(session, "exp", "north", CASES)
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def started(case: str, attempt: int) -> CaseStartedMessage:
        return CaseStartedMessage(experiment_id="exp", spoke_id="north", case_id=case,
                                  attempt=attempt, sent_at=start)

    def failed(case: str) -> ResultMessage:
        return result("north", case).model_copy(update={
            "status": CaseStatus.FAILED, "output": None,
            "failure": Failure(reason=FailureReason.EXIT_CODE, detail="exit 1")})

    batch = [started("c0", 1), spokes.sign(failed("c0")),
             started("c0", 2),  # the retry starts after its failed first attempt
             CaseProgressMessage(experiment_id="exp", spoke_id="north", case_id="c0",
                                 attempt=2, fraction=0.5, sent_at=start),
             spokes.sign(result("north", "c1")), started("c1", 1),  # late: ignored
             started("c2", 1), spokes.sign(result("north", "c2", 2.0)),
             # A failure whose start report was lost, then its retry's start.
             spokes.sign(failed("c3")), started("c3", 2)]
    with Session(engine) as session:
        outcomes = ingest_batch(session, batch)
    assert all(isinstance(outcome, bool) for outcome in outcomes), outcomes
    for message in batch:
        with Session(alone) as session:
            ingest_batch(session, [message])
    together, one_by_one = _case_columns(engine), _case_columns(alone)
    assert together == one_by_one
    assert together["c0"][:2] == (CaseState.RUNNING, 2)  # the retry, not the failure
    assert together["c3"][:2] == (CaseState.RUNNING, 2)
    assert together["c0"][7] == 0.5
    assert together["c1"][0] == together["c2"][0] == CaseState.SUCCEEDED
    assert together["c2"][2] == {"volume": 2.0}
