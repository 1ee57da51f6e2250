"""Launches bound to data access requests: the hub's check that a launch stays inside the
committee's conditions, the atomic spend of a request's ε budget, the grant launch
messages carry to the spokes' stewards, and the request's record in a study's bundle.

When the hub requires access requests (``require_access_requests``), a launch with no
approved, unexpired request of the launcher's own is refused; a launch bound to a request
is held to its conditions whatever that setting says."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from tributary.hub.models import (
    AccessRequest,
    AccessRequestState,
    AccessVote,
    AuditEvent,
    Experiment,
    TrainingStudy,
    utcnow,
)
from tributary.hub.services import access_requests
from tributary.protocol.cohorts.access import AccessConditions, AccessGrant, StudyKind

#: Tolerance of the ε arithmetic (floats): budgets are compared to this precision.
EPSILON_SLACK = 1e-9


class AccessRefused(ValueError):
    """A launch outside its access request: ``condition`` names which one."""

    def __init__(self, condition: str, reason: str) -> None:
        self.condition, self.reason = condition, reason
        super().__init__(f"{condition}: {reason}")

    def detail(self) -> dict[str, str]:
        """The API's 409 body."""
        return {"message": f"not launched: {self.reason}", "condition": self.condition}


@dataclass(frozen=True)
class LaunchAsk:
    """What a launch asks of its request."""

    kind: StudyKind
    spokes: list[str]
    attributes: list[str] = field(default_factory=list)
    #: The k the study runs with: the hub's small-cell threshold for an experiment, the
    #: fewest spokes whose sum is revealed (min_participants) for a training study; None
    #: where each site applies its own k (a PSI's cardinality) or none applies.
    k: int | None = None
    epsilon: float = 0.0


def experiment_attributes(experiment: Experiment) -> list[str]:
    """The case attributes an experiment uses: those it asks released and those its
    cohort selects on."""
    selected = list((experiment.cohort or {}).get("attributes") or {})
    return list(dict.fromkeys([*experiment.release, *selected]))


def check(session: Session, request_id: str | None, actor: str, ask: LaunchAsk,
          required: bool, now: datetime | None = None) -> AccessRequest | None:
    """The request ``ask`` may launch under (None: unbound and not required), or
    :class:`AccessRefused` naming the first condition it breaks."""
    if request_id is None:
        if required:
            raise AccessRefused("access_request", "this hub requires an approved data access "
                                "request for every launch; bind the study to one of yours "
                                "(access_request_id)")
        return None
    request = session.get(AccessRequest, request_id)
    if request is None:
        raise AccessRefused("access_request", f"no access request {request_id!r}")
    if request.requested_by != actor:
        raise AccessRefused("requester", f"access request {request.id} is "
                            f"{request.requested_by}'s; only its requester launches under it")
    if request.state != AccessRequestState.APPROVED.value or not request.conditions:
        why = f": {request.refusal_reason}" if request.refusal_reason else ""
        raise AccessRefused("state", f"access request {request.id} is {request.state}{why}")
    conditions = AccessConditions.model_validate(request.conditions)
    if (now or utcnow()) >= conditions.expires_at:
        raise AccessRefused("expires_at", f"access request {request.id} expired on "
                            f"{conditions.expires_at.isoformat()}")
    if ask.kind not in conditions.study_kinds:
        raise AccessRefused("study_kinds", f"access request {request.id} does not allow "
                            f"{ask.kind.value} studies")
    spokes = [s for s in ask.spokes if s not in conditions.spokes]
    if spokes:
        raise AccessRefused("spokes", f"spoke(s) {', '.join(spokes)} not allowed by access "
                            f"request {request.id}")
    attributes = [a for a in ask.attributes if a not in conditions.attributes]
    if attributes:
        raise AccessRefused("attributes", f"attribute(s) {', '.join(attributes)} not allowed "
                            f"by access request {request.id}")
    if ask.k is not None and ask.k < conditions.min_k:
        raise AccessRefused("min_k", f"k {ask.k} is below the minimum {conditions.min_k} of "
                            f"access request {request.id}")
    if ask.kind == StudyKind.TRAINING:
        left = (conditions.epsilon_budget or 0.0) - request.epsilon_spent
        if ask.epsilon > left + EPSILON_SLACK:
            raise AccessRefused("epsilon_budget", f"ε {ask.epsilon} exceeds the {left:g} left "
                                f"of access request {request.id}'s budget")
    return request


def spend(session: Session, request: AccessRequest, epsilon: float) -> None:
    """Take ``epsilon`` from the request's budget in one conditional UPDATE, inside the
    caller's transaction: the row is locked until it commits, and a concurrent launch's
    UPDATE sees the spent value, so two launches cannot both spend the last of it."""
    budget = float((request.conditions or {}).get("epsilon_budget") or 0.0)
    result = session.execute(
        update(AccessRequest)
        .where(col(AccessRequest.id) == request.id,
               col(AccessRequest.state) == AccessRequestState.APPROVED.value,
               col(AccessRequest.epsilon_spent) + epsilon <= budget + EPSILON_SLACK)
        .values(epsilon_spent=col(AccessRequest.epsilon_spent) + epsilon))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise AccessRefused("epsilon_budget", f"ε {epsilon} exceeds what is left of access "
                            f"request {request.id}'s budget (another launch spent it)")
    session.refresh(request)


def grant(request: AccessRequest | None) -> AccessGrant | None:
    """What launch messages carry about the request, for the sites' stewards."""
    if request is None or not request.conditions or request.decided_at is None:
        return None
    return AccessGrant(request_id=request.id, title=request.title,
                       conditions=AccessConditions.model_validate(request.conditions),
                       decided_at=request.decided_at)


def grant_for(session: Session, study: Experiment | TrainingStudy) -> AccessGrant | None:
    if study.access_request_id is None:
        return None
    return grant(session.get(AccessRequest, study.access_request_id))


def bundle_record(session: Session, request_id: str | None) -> dict[str, Any] | None:
    """The request, the committee's votes and decision and every audit event about it, as
    a study's bundle carries them (the attachments by digest, not their content)."""
    if request_id is None:
        return None
    request = session.get(AccessRequest, request_id)
    if request is None:
        return None
    read = access_requests.read(session, request).model_dump(mode="json")
    votes = session.exec(select(AccessVote).where(AccessVote.request_id == request_id)
                         .order_by(col(AccessVote.id))).all()
    read["votes"] = [v.model_dump(mode="json") for v in votes]
    events = session.exec(select(AuditEvent).where(AuditEvent.target == request_id)
                          .order_by(col(AuditEvent.id))).all()
    read["audit_events"] = [{"at": e.at.isoformat(), "actor": e.actor, "action": e.action,
                             "target": e.target, "detail": e.detail, "log_seq": e.log_seq,
                             "log_hash": e.log_hash} for e in events]
    return read
