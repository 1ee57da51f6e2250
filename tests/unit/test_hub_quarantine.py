"""Validly signed results the hub must still not count (issue 10, item 14): a case the spoke
never accepted, a custody record naming another image than the experiment's approved
version, a result after the spoke refused the experiment, and a success with no output.
Each is quarantined with its reason, and the spoke's custody chain goes on unbroken."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from signed_results import DIGEST, Spokes, accept, add_experiment
from sqlmodel import Session, select

from tributary.hub.db import make_engine
from tributary.hub.models import AuditEvent, CaseResult, Experiment, QuarantinedMessage
from tributary.hub.services.aggregation import aggregate
from tributary.hub.services.ingest import ingest
from tributary.protocol.messages import (
    CaseStartedMessage,
    CaseStatus,
    ExperimentStatusMessage,
    ResultMessage,
)
from tributary.protocol.messages import ExperimentState as SpokeState

OTHER_DIGEST = "sha256:" + "f" * 64
NODULE = {"center_mm": [0, 0, 0], "diameter_mm": 10}


@pytest.fixture
def hub(tmp_path) -> Iterator[tuple[Session, Spokes]]:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    with Session(engine) as session:
        spokes = Spokes(session, ["site-a"])
        add_experiment(session, "exp-1", ["site-a"], "summary", {})
        yield session, spokes


def result(case: str, output: dict[str, Any] | None = None, digest: str | None = DIGEST,
           status: CaseStatus = CaseStatus.SUCCEEDED) -> ResultMessage:
    return ResultMessage(experiment_id="exp-1", spoke_id="site-a", case_id=case, status=status,
                         output=output, image_digest=digest, finished_at=datetime.now(UTC),
                         failure={"reason": "exit_code", "detail": "exit 1"}
                         if status == CaseStatus.FAILED else None)


def quarantined(session: Session) -> list[str]:
    return [q.reason for q in session.exec(select(QuarantinedMessage)).all()]


def stored(session: Session, case: str) -> CaseResult | None:
    return session.exec(select(CaseResult).where(CaseResult.case_id == case)).first()


def assert_chain_goes_on(session: Session, spokes: Spokes) -> None:
    """The refused record was genuine: the next result of the spoke is accepted."""
    assert ingest(session, spokes.sign(result("c-2", {"findings": [NODULE]})))
    assert stored(session, "c-2").state == "succeeded"


def test_result_for_a_case_the_spoke_never_accepted(hub: tuple[Session, Spokes]) -> None:
    session, spokes = hub
    accept(session, "exp-1", "site-a", ["c-1", "c-2"])
    assert not ingest(session, spokes.sign(result("c-9", {"findings": [NODULE]})))
    assert stored(session, "c-9") is None
    assert any("never accepted" in r and "c-9" in r for r in quarantined(session))
    events = session.exec(select(AuditEvent).where(AuditEvent.target == "exp-1")).all()
    assert any(e.action == "result.quarantined" and e.detail["case"] == "c-9" for e in events)
    assert any(e.action == "message.received" and e.detail.get("quarantined")
               and not e.detail["duplicate"] for e in events)
    assert_chain_goes_on(session, spokes)
    report = aggregate(session, session.get(Experiment, "exp-1"), min_cell_size=1)
    assert report.groups["site-a"].cases == 2


def test_started_report_does_not_make_a_case_accepted(hub: tuple[Session, Spokes]) -> None:
    session, spokes = hub
    accept(session, "exp-1", "site-a", ["c-1", "c-2"])
    ingest(session, CaseStartedMessage(experiment_id="exp-1", spoke_id="site-a", case_id="c-9"))
    assert not ingest(session, spokes.sign(result("c-9", {"findings": []})))
    assert stored(session, "c-9") is None
    assert any("never accepted" in r for r in quarantined(session))


def test_result_from_another_image_than_the_approved_version(
        hub: tuple[Session, Spokes]) -> None:
    session, spokes = hub
    accept(session, "exp-1", "site-a", ["c-1", "c-2"])
    assert not ingest(session, spokes.sign(result("c-1", {"findings": []}, OTHER_DIGEST)))
    assert stored(session, "c-1").state == "queued"
    assert any("image" in r and OTHER_DIGEST[:19] in r for r in quarantined(session))
    assert_chain_goes_on(session, spokes)


def test_success_naming_no_image_is_quarantined(hub: tuple[Session, Spokes]) -> None:
    session, spokes = hub
    accept(session, "exp-1", "site-a", ["c-1", "c-2"])
    assert not ingest(session, spokes.sign(result("c-1", {"findings": []}, None)))
    assert stored(session, "c-1").state == "queued"
    assert any("image" in r for r in quarantined(session))


def test_result_after_the_spoke_refused_the_experiment(hub: tuple[Session, Spokes]) -> None:
    session, spokes = hub
    ingest(session, ExperimentStatusMessage(experiment_id="exp-1", spoke_id="site-a",
                                            state=SpokeState.REFUSED, reason="policy"))
    assert not ingest(session, spokes.sign(result("c-1", {"findings": [NODULE]})))
    assert stored(session, "c-1") is None
    assert any("refused" in r for r in quarantined(session))
    report = aggregate(session, session.get(Experiment, "exp-1"), min_cell_size=1)
    assert report.groups.get("site-a") is None or report.groups["site-a"].succeeded == 0


def test_success_without_output(hub: tuple[Session, Spokes]) -> None:
    session, spokes = hub
    accept(session, "exp-1", "site-a", ["c-1", "c-2"])
    assert not ingest(session, spokes.sign(result("c-1", None)))
    assert stored(session, "c-1").state == "queued"
    assert any("no output" in r for r in quarantined(session))
    assert_chain_goes_on(session, spokes)


def test_failure_with_no_image_is_still_accepted(hub: tuple[Session, Spokes]) -> None:
    """A spoke that could not pull the image reports a failure naming none: that counts."""
    session, spokes = hub
    accept(session, "exp-1", "site-a", ["c-1", "c-2"])
    assert ingest(session, spokes.sign(result("c-1", None, None, CaseStatus.FAILED)))
    assert stored(session, "c-1").state == "failed"
    assert quarantined(session) == []
