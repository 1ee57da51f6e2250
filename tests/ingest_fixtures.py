"""What the hub-ingest tests share: a hub database with two enrolled spokes and a launched
experiment, and results signed into a custody chain the way a spoke signs them. Imported
by unit and end-to-end tests alike (``tests`` is on pytest's python path)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
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
from tributary.hub.services.ingest import ingest
from tributary.protocol.custody import GENESIS, CustodyRecord, record_hash, sign_custody
from tributary.protocol.messages import CaseStatus, ExperimentStatusMessage, ResultMessage
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
