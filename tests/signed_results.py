"""Builds a hub database with spokes and an experiment, and feeds it results signed the
way a spoke signs them (custody chain), for tests that exercise ingestion and aggregation
without running spoke processes. :class:`Chain` and the ``keys``/``session`` fixtures serve
the tests that forge chains (explicit sequence numbers and predecessors)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from tributary.hub.db import make_engine
from tributary.hub.models import (
    Algorithm,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Spoke,
    SpokeKey,
    TargetState,
)
from tributary.hub.services import audit
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


def audited_hub(directory: Path) -> Engine:
    """A hub database with its forensic audit log, as ingest tests need it."""
    engine = make_engine(f"sqlite:///{directory / 'hub.db'}")
    audit.attach_forensic_log(engine, directory / "audit.jsonl")
    return engine


def study_of(engine: Engine, spoke_ids: list[str], targeted: list[str],
             case_ids: list[str]) -> Spokes:
    """Enrolled spokes and a ``summary`` study "exp" whose ``targeted`` spokes accepted
    ``case_ids``."""
    with Session(engine) as session:
        spokes = Spokes(session, spoke_ids)
        add_experiment(session, "exp", targeted, "summary", {})
        for spoke in targeted:
            accept(session, "exp", spoke, case_ids)
    return spokes


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
