"""Read models of experiments: per-spoke progress and case lists, for API and pages. Each
target says in words what it is waiting for, so a coordinator can tell "the spoke is
offline, the experiment waits for it in the broker" from "the spoke is working"."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime

from sqlmodel import Session, select

from tributary.hub.models import (
    Algorithm,
    CaseAttempt,
    CaseResult,
    Experiment,
    ExperimentTarget,
    Spoke,
    TargetState,
)
from tributary.hub.schemas import AttemptRead, CaseRead, ExperimentRead, TargetProgress
from tributary.hub.services.liveness import is_online

#: The default liveness window (seconds); the API passes the hub's configured one.
DEFAULT_ONLINE_SECONDS = 90.0


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "never"


def waiting_for(target: ExperimentTarget, spoke: Spoke | None, online: bool,
                counts: Counter[str]) -> str | None:
    """What a target waits for, in words; None once the spoke has finished with it."""
    name = target.spoke_id
    offline = "" if online else (f"; spoke {name} offline (last heard "
                                 f"{_when(spoke.last_seen_at if spoke else None)})")
    if target.state == TargetState.PENDING:
        return "not published yet: launch again once the broker is reachable"
    if target.state == TargetState.PUBLISHED:
        if online:
            return f"waiting in spoke {name}'s queue for the spoke to accept it"
        return (f"waiting in the broker for spoke {name}, offline since "
                f"{_when(spoke.last_seen_at if spoke else None)}")
    if target.state == TargetState.HELD:
        return (f"waiting for spoke {name}'s data steward: "
                f"{target.reason or 'a decision'}{offline}")
    if target.state == TargetState.ACCEPTED:
        return (f"spoke {name}: {counts['running']} running, {counts['queued']} queued"
                f"{offline}")
    if target.state == TargetState.CANCELLING:
        return f"waiting for spoke {name} to confirm the cancellation{offline}"
    return None


def target_progress(session: Session, experiment_id: str,
                    online_seconds: float = DEFAULT_ONLINE_SECONDS) -> list[TargetProgress]:
    targets = session.exec(select(ExperimentTarget).where(
        ExperimentTarget.experiment_id == experiment_id).order_by(ExperimentTarget.spoke_id)).all()
    cases = session.exec(select(CaseResult).where(CaseResult.experiment_id == experiment_id)).all()
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for c in cases:
        counts[c.spoke_id][c.state.value] += 1
    reads = []
    for t in targets:
        spoke = session.get(Spoke, t.spoke_id)
        online = spoke is not None and is_online(spoke, online_seconds)
        mine = counts[t.spoke_id]
        reads.append(TargetProgress(
            spoke_id=t.spoke_id, state=t.state.value, reason=t.reason, case_count=t.case_count,
            queued=mine["queued"], running=mine["running"], succeeded=mine["succeeded"],
            failed=mine["failed"], cancelled=mine["cancelled"], spoke_online=online,
            spoke_last_seen_at=spoke.last_seen_at if spoke else None,
            waiting_for=waiting_for(t, spoke, online, mine)))
    return reads


def experiment_reads(session: Session,
                     online_seconds: float = DEFAULT_ONLINE_SECONDS) -> list[ExperimentRead]:
    """Every experiment, newest first."""
    rows = session.exec(select(Experiment).order_by(Experiment.created_at.desc())).all()  # type: ignore[attr-defined]
    return [experiment_read(session, e, online_seconds) for e in rows]


def experiment_read(session: Session, experiment: Experiment,
                    online_seconds: float = DEFAULT_ONLINE_SECONDS) -> ExperimentRead:
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
        expires_at=experiment.expires_at, cancelled_at=experiment.cancelled_at,
        cancel_reason=experiment.cancel_reason,
        targets=target_progress(session, experiment.id, online_seconds),
    )


def case_reads(session: Session, experiment_id: str) -> list[CaseRead]:
    rows = session.exec(select(CaseResult).where(CaseResult.experiment_id == experiment_id)
                        .order_by(CaseResult.spoke_id, CaseResult.case_id)).all()
    history: dict[tuple[str, str], list[AttemptRead]] = defaultdict(list)
    for a in session.exec(select(CaseAttempt).where(CaseAttempt.experiment_id == experiment_id)
                          .order_by(CaseAttempt.attempt)).all():
        history[(a.spoke_id, a.case_id)].append(AttemptRead(
            attempt=a.attempt, state=a.state.value, failure=a.failure, started_at=a.started_at,
            finished_at=a.finished_at, received_at=a.received_at))
    return [CaseRead(spoke_id=r.spoke_id, case_id=r.case_id, state=r.state.value,
                     attempt=r.attempt, output=r.output, failure=r.failure,
                     released=r.released or {}, image_digest=r.image_digest,
                     started_at=r.started_at, finished_at=r.finished_at,
                     progress_fraction=r.progress_fraction, progress_message=r.progress_message,
                     progress_at=r.progress_at, note=r.note,
                     attempts=history[(r.spoke_id, r.case_id)]) for r in rows]
