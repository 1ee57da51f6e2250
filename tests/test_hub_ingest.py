"""Result ingestion is idempotent: duplicates and redeliveries never count twice."""

from datetime import UTC, datetime

import pytest
from sqlmodel import Session, select

from tributary.hub.db import make_engine
from tributary.hub.models import (
    Algorithm,
    CaseResult,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Spoke,
    TargetState,
)
from tributary.hub.services.aggregation import aggregate
from tributary.hub.services.ingest import Rejected, ingest
from tributary.protocol.messages import (
    CaseStatus,
    ExperimentStatusMessage,
    ResultMessage,
)
from tributary.protocol.messages import (
    ExperimentState as SpokeState,
)


@pytest.fixture
def session(tmp_path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    with Session(engine) as s:
        s.add(Spoke(id="site-a", name="A"))
        s.add(Algorithm(id=1, name="n", version="1", repository="r/x", digest="sha256:" + "0" * 64))
        s.flush()
        s.add(Experiment(id="exp-1", name="e", algorithm_id=1, aggregator="nodule-detection",
                         state=ExperimentState.LAUNCHED))
        s.flush()
        s.add(ExperimentTarget(experiment_id="exp-1", spoke_id="site-a",
                               state=TargetState.PUBLISHED))
        s.commit()
        yield s


def result(case: str, findings: list, truth: list) -> ResultMessage:
    return ResultMessage(experiment_id="exp-1", spoke_id="site-a", case_id=case,
                         status=CaseStatus.SUCCEEDED, output={"findings": findings},
                         released={"nodules": truth}, finished_at=datetime.now(UTC))


def test_duplicates_and_resends_count_once(session: Session) -> None:
    accepted = ExperimentStatusMessage(experiment_id="exp-1", spoke_id="site-a",
                                       state=SpokeState.ACCEPTED, case_ids=["c-1", "c-2"])
    assert ingest(session, accepted)
    assert not ingest(session, accepted)  # same message id: redelivery
    nodule = {"center_mm": [0, 0, 0], "diameter_mm": 10}
    first = result("c-1", [nodule], [nodule])
    assert ingest(session, first)
    assert not ingest(session, first)
    # The same result published again under a new message id (spoke restart) is ignored.
    again = result("c-1", [], [nodule])
    assert not ingest(session, again)
    assert ingest(session, result("c-2", [], []))
    done = ExperimentStatusMessage(experiment_id="exp-1", spoke_id="site-a",
                                   state=SpokeState.COMPLETED, case_ids=["c-1", "c-2"])
    assert ingest(session, done)
    rows = session.exec(select(CaseResult)).all()
    assert len(rows) == 2
    figures = aggregate(session, session.get(Experiment, "exp-1")).groups["site-a"]
    assert figures["succeeded"] == 2
    assert figures["true_positives"] == 1 and figures["false_negatives"] == 0
    assert session.get(Experiment, "exp-1").state == ExperimentState.COMPLETED


def test_messages_from_strangers_are_rejected(session: Session) -> None:
    with pytest.raises(Rejected, match="unregistered spoke"):
        ingest(session, ResultMessage(experiment_id="exp-1", spoke_id="site-zz", case_id="c-1",
                                      status=CaseStatus.FAILED))
    with pytest.raises(Rejected, match="does not target"):
        ingest(session, ResultMessage(experiment_id="exp-9", spoke_id="site-a", case_id="c-1",
                                      status=CaseStatus.FAILED))
