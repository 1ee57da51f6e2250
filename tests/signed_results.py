"""Builds a hub database with spokes and an experiment, and feeds it results signed the
way a spoke signs them (custody chain), for tests that exercise ingestion and aggregation
without running spoke processes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session

from tributary.hub.models import (
    Algorithm,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Spoke,
    SpokeKey,
    TargetState,
)
from tributary.hub.services.ingest import ingest
from tributary.protocol.custody import GENESIS, CustodyRecord, record_hash, sign_custody
from tributary.protocol.messages import CaseStatus, ExperimentStatusMessage, ResultMessage
from tributary.protocol.messages import ExperimentState as SpokeState
from tributary.protocol.signing import SigningKey

DIGEST = "sha256:" + "0" * 64


class Spokes:
    """Enrolled spokes, each with its key and custody chain head."""

    def __init__(self, session: Session, spoke_ids: list[str]) -> None:
        self.keys = {s: SigningKey.generate() for s in spoke_ids}
        self.heads = {s: (0, GENESIS) for s in spoke_ids}
        for spoke, key in self.keys.items():
            session.add(Spoke(id=spoke, name=spoke))
            session.flush()
            session.add(SpokeKey(keyid=key.keyid, spoke_id=spoke, public_key_pem=key.public.pem))
        session.commit()

    def sign(self, result: ResultMessage) -> ResultMessage:
        sequence, head = self.heads[result.spoke_id]
        record = CustodyRecord(
            experiment_id=result.experiment_id, spoke_id=result.spoke_id, case_id=result.case_id,
            attempt=result.attempt, sequence=sequence + 1, previous_record_sha256=head,
            image_digest=result.image_digest, participant_sha256="1" * 64,
            input_sha256="2" * 64, deid_profile="test", spoke_version="test",
            started_at=None, finished_at=result.finished_at, status=result.status.value,
            exit_code=0, failure_reason=None)
        envelope = sign_custody(self.keys[result.spoke_id], record, result)
        self.heads[result.spoke_id] = (sequence + 1, record_hash(envelope))
        return result.model_copy(update={"custody": envelope})


def add_experiment(session: Session, experiment_id: str, spokes: list[str], aggregator: str,
                   parameters: dict[str, Any]) -> None:
    if session.get(Algorithm, 1) is None:
        session.add(Algorithm(id=1, name="alg", version="1", repository="r/alg", digest=DIGEST,
                              approval={"approved": True}))
        session.flush()
    session.add(Experiment(id=experiment_id, name=experiment_id, algorithm_id=1,
                           aggregator=aggregator, aggregator_parameters=parameters,
                           state=ExperimentState.LAUNCHED))
    session.flush()
    for spoke in spokes:
        session.add(ExperimentTarget(experiment_id=experiment_id, spoke_id=spoke,
                                     state=TargetState.PUBLISHED))
    session.commit()


def accept(session: Session, experiment_id: str, spoke: str, case_ids: list[str]) -> None:
    ingest(session, ExperimentStatusMessage(experiment_id=experiment_id, spoke_id=spoke,
                                            state=SpokeState.ACCEPTED, case_ids=case_ids))


def send_result(session: Session, spokes: Spokes, experiment_id: str, spoke: str, case: str,
                output: dict[str, Any] | None, released: dict[str, Any] | None = None,
                failed: bool = False) -> bool:
    result = ResultMessage(
        experiment_id=experiment_id, spoke_id=spoke, case_id=case,
        status=CaseStatus.FAILED if failed else CaseStatus.SUCCEEDED,
        output=None if failed else output, released=released or {}, image_digest=DIGEST,
        finished_at=datetime.now(UTC),
        failure={"reason": "exit_code", "detail": "exit 1"} if failed else None)
    return ingest(session, spokes.sign(result))
