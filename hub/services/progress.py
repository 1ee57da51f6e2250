"""Read models of experiments: per-spoke progress and case lists, for API and pages."""

from __future__ import annotations

from collections import Counter

from sqlmodel import Session, select

from tributary.hub.api.schemas import CaseRead, ExperimentRead, TargetProgress
from tributary.hub.models import Algorithm, CaseResult, Experiment, ExperimentTarget


def target_progress(session: Session, experiment_id: str) -> list[TargetProgress]:
    targets = session.exec(select(ExperimentTarget).where(
        ExperimentTarget.experiment_id == experiment_id).order_by(ExperimentTarget.spoke_id)).all()
    cases = session.exec(select(CaseResult).where(CaseResult.experiment_id == experiment_id)).all()
    counts = Counter((c.spoke_id, c.state.value) for c in cases)
    return [
        TargetProgress(
            spoke_id=t.spoke_id, state=t.state.value, reason=t.reason, case_count=t.case_count,
            queued=counts[(t.spoke_id, "queued")], running=counts[(t.spoke_id, "running")],
            succeeded=counts[(t.spoke_id, "succeeded")], failed=counts[(t.spoke_id, "failed")],
        )
        for t in targets
    ]


def experiment_read(session: Session, experiment: Experiment) -> ExperimentRead:
    algorithm = session.get(Algorithm, experiment.algorithm_id)
    assert algorithm is not None
    return ExperimentRead(
        id=experiment.id, name=experiment.name, state=experiment.state.value,
        algorithm_id=algorithm.id or 0, algorithm=f"{algorithm.name} {algorithm.version}",
        image=f"{algorithm.repository}@{algorithm.digest}", arguments=experiment.arguments,
        cohort=experiment.cohort, limits=experiment.limits, release=experiment.release,
        aggregator=experiment.aggregator,
        aggregator_parameters=experiment.aggregator_parameters or {},
        created_at=experiment.created_at,
        launched_at=experiment.launched_at, completed_at=experiment.completed_at,
        expires_at=experiment.expires_at, targets=target_progress(session, experiment.id),
    )


def case_reads(session: Session, experiment_id: str) -> list[CaseRead]:
    rows = session.exec(select(CaseResult).where(CaseResult.experiment_id == experiment_id)
                        .order_by(CaseResult.spoke_id, CaseResult.case_id)).all()
    return [CaseRead(spoke_id=r.spoke_id, case_id=r.case_id, state=r.state.value,
                     attempt=r.attempt, output=r.output, failure=r.failure,
                     released=r.released or {}, image_digest=r.image_digest,
                     started_at=r.started_at, finished_at=r.finished_at) for r in rows]
