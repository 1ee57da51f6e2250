"""Read models of experiments: per-spoke progress and case lists, for API and pages. Each
target says in words what it is waiting for, so a coordinator can tell "the spoke is
offline, the experiment waits for it in the broker" from "the spoke is working"."""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import func, or_, tuple_
from sqlalchemy.orm import defer
from sqlmodel import Session, col, select

from tributary.hub.models import (
    Algorithm,
    CaseAttempt,
    CaseResult,
    CaseState,
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


def state_counts(session: Session, experiment_ids: list[str]
                 ) -> dict[tuple[str, str], Counter[str]]:
    """Cases per (experiment, spoke) and state, counted by the database: never loads a
    case row, so progress costs the same at 30 cases as at 30,000."""
    counts: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    if not experiment_ids:
        return counts
    rows = session.exec(
        select(CaseResult.experiment_id, CaseResult.spoke_id, CaseResult.state,
               func.count()).where(col(CaseResult.experiment_id).in_(experiment_ids))
        .group_by(CaseResult.experiment_id, CaseResult.spoke_id, CaseResult.state)).all()
    for experiment_id, spoke_id, state, n in rows:
        counts[(experiment_id, spoke_id)][getattr(state, "value", state)] = n
    return counts


def target_progress(session: Session, experiment_id: str,
                    online_seconds: float = DEFAULT_ONLINE_SECONDS,
                    counted: dict[tuple[str, str], Counter[str]] | None = None,
                    spokes: dict[str, Spoke] | None = None) -> list[TargetProgress]:
    """Per target spoke: its state, case counts by state and what it waits for.
    ``counted`` and ``spokes`` let a caller share one query across experiments."""
    targets = session.exec(select(ExperimentTarget).where(
        ExperimentTarget.experiment_id == experiment_id).order_by(ExperimentTarget.spoke_id)).all()
    if counted is None:
        counted = state_counts(session, [experiment_id])
    if spokes is None:
        ids = [t.spoke_id for t in targets]
        spokes = {s.id: s for s in session.exec(
            select(Spoke).where(col(Spoke.id).in_(ids))).all()} if ids else {}
    reads = []
    for t in targets:
        spoke = spokes.get(t.spoke_id)
        online = spoke is not None and is_online(spoke, online_seconds)
        mine = counted.get((experiment_id, t.spoke_id), Counter())
        reads.append(TargetProgress(
            spoke_id=t.spoke_id, state=t.state.value, reason=t.reason, case_count=t.case_count,
            queued=mine["queued"], running=mine["running"], succeeded=mine["succeeded"],
            failed=mine["failed"], cancelled=mine["cancelled"], spoke_online=online,
            spoke_last_seen_at=spoke.last_seen_at if spoke else None,
            waiting_for=waiting_for(t, spoke, online, mine), withdrawn_at=t.withdrawn_at))
    return reads


def experiment_reads(session: Session,
                     online_seconds: float = DEFAULT_ONLINE_SECONDS) -> list[ExperimentRead]:
    """Every experiment, newest first."""
    rows = session.exec(select(Experiment).order_by(Experiment.created_at.desc())).all()  # type: ignore[attr-defined]
    counted = state_counts(session, [e.id for e in rows])
    spokes = {s.id: s for s in session.exec(select(Spoke)).all()}
    return [experiment_read(session, e, online_seconds, counted, spokes) for e in rows]


def experiment_read(session: Session, experiment: Experiment,
                    online_seconds: float = DEFAULT_ONLINE_SECONDS,
                    counted: dict[tuple[str, str], Counter[str]] | None = None,
                    spokes: dict[str, Spoke] | None = None) -> ExperimentRead:
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
        targets=target_progress(session, experiment.id, online_seconds, counted, spokes),
        sandbox=experiment.sandbox, owner=experiment.owner,
        access_request_id=experiment.access_request_id,
    )


#: Default and largest page of the case list.
DEFAULT_CASE_LIMIT = 100
MAX_CASE_LIMIT = 1000


class CasePage:
    """One page of an experiment's cases in (spoke, case) order, with the cursor of the
    next page (None on the last), filtered by spoke, state and failure reason."""

    def __init__(self, cases: list[CaseRead], next_cursor: str | None) -> None:
        self.cases, self.next_cursor = cases, next_cursor


def encode_cursor(spoke_id: str, case_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([spoke_id, case_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The (spoke, case) a cursor points after; ValueError if it is not one of ours."""
    try:
        spoke_id, case_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValueError("invalid cursor") from exc
    if not isinstance(spoke_id, str) or not isinstance(case_id, str):
        raise ValueError("invalid cursor")
    return spoke_id, case_id


def _attempts(session: Session, experiment_id: str, rows: list[CaseResult]
              ) -> dict[tuple[str, str], list[AttemptRead]]:
    """The attempt history of exactly these cases: (spoke, case) pairs matched as row
    values on the unique index, in chunks, so a page of cases spread over many spokes
    never reads the other spokes' attempts."""
    history: dict[tuple[str, str], list[AttemptRead]] = defaultdict(list)
    wanted = sorted({(r.spoke_id, r.case_id) for r in rows})
    for start in range(0, len(wanted), 400):
        chunk = wanted[start:start + 400]
        for a in session.exec(select(CaseAttempt).where(
                CaseAttempt.experiment_id == experiment_id,
                tuple_(col(CaseAttempt.spoke_id), col(CaseAttempt.case_id)).in_(chunk))
                .order_by(CaseAttempt.attempt)).all():
            history[(a.spoke_id, a.case_id)].append(AttemptRead(
                attempt=a.attempt, state=a.state.value, failure=a.failure,
                started_at=a.started_at, finished_at=a.finished_at, received_at=a.received_at))
    return history


def _case_read(r: CaseResult, attempts: list[AttemptRead]) -> CaseRead:
    return CaseRead(spoke_id=r.spoke_id, case_id=r.case_id, state=r.state.value,
                    attempt=r.attempt, output=r.output, failure=r.failure,
                    released=r.released or {}, image_digest=r.image_digest,
                    started_at=r.started_at, finished_at=r.finished_at,
                    progress_fraction=r.progress_fraction, progress_message=r.progress_message,
                    progress_at=r.progress_at, note=r.note, attempts=attempts)


def case_read(session: Session, experiment_id: str, spoke_id: str,
              case_id: str) -> CaseRead | None:
    """One case with its attempt history (for the case page), or None."""
    row = session.exec(select(CaseResult).options(defer(CaseResult.custody))  # type: ignore[arg-type]
                       .where(CaseResult.experiment_id == experiment_id,
                              CaseResult.spoke_id == spoke_id,
                              CaseResult.case_id == case_id)).first()
    if row is None:
        return None
    return _case_read(row, _attempts(session, experiment_id, [row])[(spoke_id, case_id)])


def case_page(session: Session, experiment_id: str, limit: int = DEFAULT_CASE_LIMIT,
              cursor: str | None = None, spoke_id: str | None = None,
              state: str | None = None, failure_reason: str | None = None) -> CasePage:
    """One page of cases (keyset pagination on the unique (spoke, case) order, so a page
    costs the same wherever it starts and no case is skipped or repeated while others
    arrive). Raises ValueError for a bad cursor."""
    limit = max(1, min(limit, MAX_CASE_LIMIT))
    query = (select(CaseResult)  # the custody record (the largest column) is not shown
             .options(defer(CaseResult.custody))  # type: ignore[arg-type]
             .where(CaseResult.experiment_id == experiment_id))
    if spoke_id is not None:
        query = query.where(CaseResult.spoke_id == spoke_id)
    if state is not None:
        query = query.where(CaseResult.state == CaseState(state))
    if cursor:
        after_spoke, after_case = decode_cursor(cursor)
        query = query.where(or_(col(CaseResult.spoke_id) > after_spoke,
                                (col(CaseResult.spoke_id) == after_spoke)
                                & (col(CaseResult.case_id) > after_case)))
    query = query.order_by(CaseResult.spoke_id, CaseResult.case_id)
    if failure_reason is None:
        rows = list(session.exec(query.limit(limit + 1)).all())
    else:  # the reason lives in JSON: filtered here, still read in bounded chunks
        rows = []
        for r in session.exec(query.execution_options(yield_per=500)):
            if (r.failure or {}).get("reason") == failure_reason:
                rows.append(r)
                if len(rows) > limit:
                    break
    more = len(rows) > limit
    rows = rows[:limit]
    history = _attempts(session, experiment_id, rows)
    reads = [_case_read(r, history[(r.spoke_id, r.case_id)]) for r in rows]
    last = rows[-1] if more and rows else None
    return CasePage(reads, encode_cursor(last.spoke_id, last.case_id) if last else None)


def any_case_in(session: Session, experiment_id: str, state: str) -> bool:
    """Whether some case of the experiment is in ``state`` (one indexed probe)."""
    return session.exec(select(CaseResult.id).where(
        CaseResult.experiment_id == experiment_id, CaseResult.state == CaseState(state)).limit(1)
    ).first() is not None


class OutputRead(NamedTuple):
    """A succeeded case's output, for plots: no custody, released data nor attempts (and no
    model validation: tens of thousands of them are read at once)."""

    spoke_id: str
    case_id: str
    output: dict[str, Any] | None
    state: str = "succeeded"


def output_reads(session: Session, experiment_id: str,
                 spoke_id: str | None = None) -> list[OutputRead]:
    """Succeeded cases' outputs, for the distribution plots; of one spoke if ``spoke_id``
    is given."""
    query = select(CaseResult.spoke_id, CaseResult.case_id, CaseResult.output).where(
        CaseResult.experiment_id == experiment_id, CaseResult.state == CaseState.SUCCEEDED)
    if spoke_id is not None:
        query = query.where(CaseResult.spoke_id == spoke_id)
    return [OutputRead(s, c, o) for s, c, o in session.exec(query).all()]


def case_reads(session: Session, experiment_id: str) -> list[CaseRead]:
    """Every case (for callers that need them all at once; prefer :func:`case_page`)."""
    rows = list(session.exec(select(CaseResult).where(CaseResult.experiment_id == experiment_id)
                             .order_by(CaseResult.spoke_id, CaseResult.case_id)).all())
    history: dict[tuple[str, str], list[AttemptRead]] = defaultdict(list)
    for a in session.exec(select(CaseAttempt).where(CaseAttempt.experiment_id == experiment_id)
                          .order_by(CaseAttempt.attempt)).all():
        history[(a.spoke_id, a.case_id)].append(AttemptRead(
            attempt=a.attempt, state=a.state.value, failure=a.failure, started_at=a.started_at,
            finished_at=a.finished_at, received_at=a.received_at))
    return [_case_read(r, history[(r.spoke_id, r.case_id)]) for r in rows]
