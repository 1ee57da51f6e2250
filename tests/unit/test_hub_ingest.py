"""Result ingestion: idempotent, and only for results whose signed custody record verifies
and continues the spoke's hash chain."""

from __future__ import annotations

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
    SpokeChain,
    SpokeKey,
    TargetState,
)
from tributary.hub.services.aggregation import aggregate
from tributary.hub.services.gaps import GapDetected
from tributary.hub.services.ingest import Rejected, ingest
from tributary.protocol.custody import GENESIS, CustodyRecord, record_hash, sign_custody
from tributary.protocol.messages import (
    CaseStatus,
    ExperimentStatusMessage,
    ResultMessage,
)
from tributary.protocol.messages import ExperimentState as SpokeState
from tributary.protocol.signing import SigningKey

DIGEST = "sha256:" + "0" * 64


class Chain:
    """Signs results the way a spoke does (see spoke/custody.py)."""

    def __init__(self, key: SigningKey, spoke: str = "site-a") -> None:
        self.key, self.spoke, self.sequence, self.head = key, spoke, 0, GENESIS

    def sign(self, result: ResultMessage, sequence: int | None = None,
             previous: str | None = None) -> ResultMessage:
        record = CustodyRecord(
            experiment_id=result.experiment_id, spoke_id=result.spoke_id, case_id=result.case_id,
            attempt=result.attempt, sequence=sequence or self.sequence + 1,
            previous_record_sha256=previous or self.head, image_digest=result.image_digest,
            participant_sha256="1" * 64, input_sha256="2" * 64, deid_profile="test",
            spoke_version="test", started_at=None, finished_at=result.finished_at,
            status=result.status.value, exit_code=0, failure_reason=None)
        envelope = sign_custody(self.key, record, result)
        if sequence is None:
            self.sequence, self.head = self.sequence + 1, record_hash(envelope)
        return result.model_copy(update={"custody": envelope})


@pytest.fixture
def keys() -> dict[str, SigningKey]:
    return {"site-a": SigningKey.generate(), "site-b": SigningKey.generate()}


@pytest.fixture
def session(tmp_path, keys):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    with Session(engine) as s:
        for spoke, key in keys.items():
            s.add(Spoke(id=spoke, name=spoke))
            s.flush()
            s.add(SpokeKey(keyid=key.keyid, spoke_id=spoke, public_key_pem=key.public.pem))
        s.add(Algorithm(id=1, name="n", version="1", repository="r/x", digest=DIGEST))
        s.flush()
        s.add(Experiment(id="exp-1", name="e", algorithm_id=1, aggregator="nodule-detection",
                         state=ExperimentState.LAUNCHED))
        s.flush()
        for spoke in keys:
            s.add(ExperimentTarget(experiment_id="exp-1", spoke_id=spoke,
                                   state=TargetState.PUBLISHED))
        s.commit()
        ingest(s, ExperimentStatusMessage(experiment_id="exp-1", spoke_id="site-a",
                                          state=SpokeState.ACCEPTED,
                                          case_ids=["c-1", "c-2", "c-3"]))
        yield s


def result(case: str, findings: list | None = None, truth: list | None = None,
           spoke: str = "site-a") -> ResultMessage:
    return ResultMessage(experiment_id="exp-1", spoke_id=spoke, case_id=case,
                         status=CaseStatus.SUCCEEDED, output={"findings": findings or []},
                         released={"nodules": truth or []}, image_digest=DIGEST,
                         finished_at=datetime.now(UTC))


def test_duplicates_count_once_and_figures_follow(session: Session, keys: dict) -> None:
    chain = Chain(keys["site-a"])
    nodule = {"center_mm": [0, 0, 0], "diameter_mm": 10}
    first = chain.sign(result("c-1", [nodule], [nodule]))
    assert ingest(session, first)
    assert not ingest(session, first)  # the same message again: a redelivery, no effect
    assert ingest(session, chain.sign(result("c-2")))
    assert ingest(session, ExperimentStatusMessage(
        experiment_id="exp-1", spoke_id="site-a", state=SpokeState.COMPLETED,
        case_ids=["c-1", "c-2"]))
    assert ingest(session, ExperimentStatusMessage(
        experiment_id="exp-1", spoke_id="site-b", state=SpokeState.REFUSED, reason="test"))
    assert len(session.exec(select(CaseResult)).all()) == 3  # c-3 still queued
    group = aggregate(session, session.get(Experiment, "exp-1"), min_cell_size=1).groups["site-a"]
    assert group.succeeded == 2 and group.figures["true_positives"].value == 1
    # The spoke says it is done but c-3 has no result here: not completed (issue 10, 22).
    assert session.get(Experiment, "exp-1").state == ExperimentState.LAUNCHED
    assert session.get(SpokeChain, "site-a").sequence == 2


def test_result_altered_after_signing_is_rejected(session: Session, keys: dict) -> None:
    signed = Chain(keys["site-a"]).sign(result("c-1", [{"center_mm": [0, 0, 0],
                                                        "diameter_mm": 5}]))
    altered = signed.model_copy(update={"output": {"findings": []}})
    with pytest.raises(Rejected, match="altered after signing"):
        ingest(session, altered)


def test_result_signed_by_another_spokes_key_is_rejected(session: Session, keys: dict) -> None:
    forged = Chain(keys["site-b"]).sign(result("c-1"))
    with pytest.raises(Rejected, match="custody record refused"):
        ingest(session, forged)


def test_replayed_result_is_rejected(session: Session, keys: dict) -> None:
    chain = Chain(keys["site-a"])
    original = chain.sign(result("c-1"))
    assert ingest(session, original)
    replay = original.model_copy(update={"message_id": "f" * 32})
    with pytest.raises(Rejected, match="replayed or conflicting"):
        ingest(session, replay)


def test_broken_chain_is_rejected(session: Session, keys: dict) -> None:
    chain = Chain(keys["site-a"])
    assert ingest(session, chain.sign(result("c-1")))
    chain.sign(result("c-2"))  # a record the hub never sees: deleted in transit
    with pytest.raises(GapDetected, match=r"records 2\.\.2"):  # see test_hub_gaps.py
        ingest(session, chain.sign(result("c-3")))
    with pytest.raises(Rejected, match="custody chain broken"):
        ingest(session, chain.sign(result("c-2"), sequence=2, previous=GENESIS))


def test_result_without_custody_is_rejected(session: Session) -> None:
    with pytest.raises(Rejected, match="no custody record"):
        ingest(session, result("c-1"))


def test_messages_from_strangers_are_rejected(session: Session) -> None:
    with pytest.raises(Rejected, match="unregistered spoke"):
        ingest(session, result("c-1", spoke="site-zz"))
    with pytest.raises(Rejected, match="does not target"):
        ingest(session, ResultMessage(experiment_id="exp-9", spoke_id="site-a", case_id="c-1",
                                      status=CaseStatus.FAILED))
