"""A coordinator's control over a running experiment: cancel it, withdraw one spoke from
it (the hub does, when the spoke's membership lapses), or run its failed cases again as a
new attempt. Both travel to the spokes as signed messages on their own queues,
so a spoke that is offline gets them when it returns (until they expire). Each step is
committed as it is sent: a request interrupted by a broker outage can simply be repeated."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from sqlmodel import Session, select

from tributary.hub.models import (
    TERMINAL_TARGET_STATES,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    TargetState,
    utcnow,
)
from tributary.hub.services import audit
from tributary.protocol.broker import StompClient, publish_with_retry
from tributary.protocol.destinations import spoke_queue
from tributary.protocol.messages import CancelExperimentMessage, RetryCasesMessage
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal

#: Cancellations overtake experiment messages still waiting in a spoke's queue.
CANCEL_PRIORITY = "9"


class NotAllowed(ValueError):
    """The request does not fit the experiment's state (the message says why)."""


def _send(client: StompClient, key: SigningKey, message: CancelExperimentMessage
          | RetryCasesMessage, expires_at: datetime, priority: str | None = None) -> None:
    headers = {"tributary-kind": message.kind,
               "expires": str(int(expires_at.timestamp() * 1000))}
    if priority:
        headers["priority"] = priority
    publish_with_retry(client, spoke_queue(message.spoke_id, client.settings.federation),
                       seal(message, key), headers)


def _targets(session: Session, experiment_id: str) -> list[ExperimentTarget]:
    return list(session.exec(select(ExperimentTarget).where(
        ExperimentTarget.experiment_id == experiment_id)).all())


def cancel(session: Session, client: StompClient, key: SigningKey, experiment: Experiment,
           actor: str, reason: str, expiry: timedelta) -> list[ExperimentTarget]:
    """Tell every spoke still holding the experiment to stop; cases not started yet are
    cancelled at once, running ones when their spoke confirms."""
    if experiment.state == ExperimentState.COMPLETED:
        raise NotAllowed("the experiment is already completed")
    targets = _targets(session, experiment.id)
    expires_at = utcnow() + expiry
    for target in targets:
        if target.state == TargetState.PENDING:
            target.state, target.reason = TargetState.CANCELLED, reason
        elif target.state in (TargetState.PUBLISHED, TargetState.HELD, TargetState.ACCEPTED):
            message = CancelExperimentMessage(experiment_id=experiment.id,
                                              spoke_id=target.spoke_id, reason=reason)
            _send(client, key, message, expires_at, CANCEL_PRIORITY)
            target.state, target.reason = TargetState.CANCELLING, reason
            audit.record(session, "hub", "message.sent", experiment.id, kind=message.kind,
                         spoke=target.spoke_id, message_id=message.message_id)
        else:
            continue
        target.updated_at = utcnow()
        session.add(target)
        session.commit()
    queued = session.exec(select(CaseResult).where(
        CaseResult.experiment_id == experiment.id,
        CaseResult.state == CaseState.QUEUED)).all()
    for row in queued:
        row.state, row.note = CaseState.CANCELLED, f"cancelled: {reason}"
        session.add(row)
    first = experiment.state != ExperimentState.CANCELLED
    experiment.state = ExperimentState.CANCELLED
    experiment.cancelled_at = experiment.cancelled_at or utcnow()
    experiment.cancel_reason = experiment.cancel_reason or reason
    session.add(experiment)
    audit.record(session, actor, "experiment.cancelled" if first else "experiment.cancel_resent",
                 experiment.id, reason=reason, cases_cancelled=len(queued),
                 spokes=[t.spoke_id for t in targets if t.state == TargetState.CANCELLING])
    session.commit()
    return targets


def withdraw(session: Session, client: StompClient, key: SigningKey, experiment: Experiment,
             spoke_id: str, actor: str, reason: str, expiry: timedelta) -> bool:
    """Take one spoke out of a running experiment: a cancellation to that spoke only, its
    target cancelled at once (the hub waits on it no longer, so the others can complete
    the study without it) and marked withdrawn (nothing it sends for the study counts from
    now on), its unfinished cases cancelled. Whether it was withdrawn now (False: it had
    already left the study). Committed; a :class:`PublishError` leaves it untouched."""
    target = session.exec(select(ExperimentTarget).where(  # locked: one withdrawal per hub
        ExperimentTarget.experiment_id == experiment.id,
        ExperimentTarget.spoke_id == spoke_id).with_for_update()
        .execution_options(populate_existing=True)).first()
    if (target is None or target.withdrawn_at is not None
            or target.state in TERMINAL_TARGET_STATES
            or experiment.state != ExperimentState.LAUNCHED):
        return False
    message_id = None
    if target.state != TargetState.PENDING:  # it may hold the study: tell it to stop
        message = CancelExperimentMessage(experiment_id=experiment.id, spoke_id=spoke_id,
                                          reason=reason)
        _send(client, key, message, utcnow() + expiry, CANCEL_PRIORITY)
        message_id = message.message_id
        audit.record(session, "hub", "message.sent", experiment.id, kind=message.kind,
                     spoke=spoke_id, message_id=message_id)
    previously = target.state
    target.state, target.reason = TargetState.CANCELLED, reason
    target.withdrawn_at = target.updated_at = utcnow()
    session.add(target)
    unfinished = session.exec(select(CaseResult).where(
        CaseResult.experiment_id == experiment.id, CaseResult.spoke_id == spoke_id,
        CaseResult.state.in_([CaseState.QUEUED, CaseState.RUNNING]))).all()  # type: ignore[attr-defined]
    for row in unfinished:
        row.state, row.note = CaseState.CANCELLED, f"withdrawn: {reason}"
        session.add(row)
    audit.record(session, actor, "experiment.spoke_withdrawn", experiment.id,
                 spoke=spoke_id, reason=reason, previously=previously.value,
                 cases_cancelled=len(unfinished), message_id=message_id)
    session.commit()
    return True


def retry(session: Session, client: StompClient, key: SigningKey, experiment: Experiment,
          actor: str, case_ids: list[str] | None, spoke_ids: list[str] | None,
          reason: str | None, expiry: timedelta) -> dict[str, list[str]]:
    """Run failed cases again, each as its next attempt; earlier attempts stay on record.
    Returns {spoke: cases requested}."""
    if experiment.state not in (ExperimentState.LAUNCHED, ExperimentState.COMPLETED):
        raise NotAllowed(f"the experiment is {experiment.state.value}; only launched or "
                         "completed experiments have cases to run again")
    query = select(CaseResult).where(CaseResult.experiment_id == experiment.id)
    if spoke_ids:
        query = query.where(CaseResult.spoke_id.in_(spoke_ids))  # type: ignore[attr-defined]
    rows = session.exec(query).all()
    if case_ids is not None:
        known = {r.case_id for r in rows}
        unknown = sorted(set(case_ids) - known)
        if unknown:
            raise NotAllowed(f"not cases of this experiment: {', '.join(unknown[:10])}")
        not_failed = sorted({r.case_id for r in rows
                             if r.case_id in case_ids and r.state != CaseState.FAILED})
        if not_failed:
            raise NotAllowed(f"only failed cases run again; not failed: "
                             f"{', '.join(not_failed[:10])}")
    withdrawn = {t.spoke_id for t in _targets(session, experiment.id)
                 if t.withdrawn_at is not None}  # a lapsed member runs nothing more
    chosen = [r for r in rows if r.state == CaseState.FAILED and r.spoke_id not in withdrawn
              and (case_ids is None or r.case_id in case_ids)]
    if not chosen:
        raise NotAllowed("no failed cases to run again")
    groups: dict[tuple[str, int], list[CaseResult]] = defaultdict(list)
    for row in chosen:
        groups[(row.spoke_id, row.attempt + 1)].append(row)
    expires_at = utcnow() + expiry
    requested: dict[str, list[str]] = defaultdict(list)
    for (spoke_id, attempt), group in sorted(groups.items()):
        target = session.get(ExperimentTarget, (experiment.id, spoke_id))
        assert target is not None
        message = RetryCasesMessage(experiment_id=experiment.id, spoke_id=spoke_id,
                                    case_ids=[r.case_id for r in group], attempt=attempt,
                                    reason=reason)
        _send(client, key, message, expires_at)
        for row in group:
            row.state, row.attempt = CaseState.QUEUED, attempt
            row.note = f"attempt {attempt} requested by {actor}"
            row.progress_fraction = row.progress_message = row.progress_at = None
            session.add(row)
        if target.state == TargetState.COMPLETED:
            target.state = TargetState.ACCEPTED
        target.spoke_completed_at = None  # done again only when the spoke says so again
        target.updated_at = utcnow()
        session.add(target)
        requested[spoke_id].extend(r.case_id for r in group)
        audit.record(session, "hub", "message.sent", experiment.id, kind=message.kind,
                     spoke=spoke_id, message_id=message.message_id, attempt=attempt,
                     cases=len(group))
        session.commit()
    if experiment.state == ExperimentState.COMPLETED:
        experiment.state, experiment.completed_at = ExperimentState.LAUNCHED, None
        session.add(experiment)
    audit.record(session, actor, "experiment.retry", experiment.id, reason=reason,
                 cases={s: sorted(c) for s, c in requested.items()})
    session.commit()
    return dict(requested)
