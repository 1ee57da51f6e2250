"""Data access requests and the data access committee's decisions (docs/cohorts.md).

A coordinator asks (purpose, spokes, attributes, kinds of study, ε and k, the ethics
approval and the DPIA attached); committee members decide. The rules, like the review of
algorithm versions (services/approval.py), are about who may count: the requester never
decides on their own request, administrators do not count (one administrator can create
any number of accounts), and a request is approved once ``access_committee_quorum``
members approved the *same* conditions (compared by digest); one refusal refuses it. The
committee grants no more than was asked. Every transition is audited with the request's
id as its target, so the request's page and the bundles of the studies bound to it show
the whole history."""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlmodel import Session, select

from tributary.hub.models import (
    AccessAttachment,
    AccessRequest,
    AccessRequestState,
    AccessVote,
    Experiment,
    PsiRun,
    Role,
    Spoke,
    TrainingStudy,
    User,
    VerticalStudy,
    utcnow,
)
from tributary.hub.schemas import (
    AccessAttachmentRead,
    AccessDecisionBody,
    AccessRequestRead,
    AccessVoteRead,
)
from tributary.hub.services import audit
from tributary.hub.services.access_files import KINDS, CheckedFile
from tributary.protocol.cohorts.access import (
    AccessConditions,
    Attribute,
    SpokeId,
    StudyKind,
)

#: How long an approval lasts when the committee names no date.
DEFAULT_VALIDITY = timedelta(days=365)


class AccessError(ValueError):
    """A transition the workflow refuses (HTTP 409), saying why."""


class AccessForbidden(AccessError):
    """The user may not do this to this request (HTTP 403)."""


class RequestSpec(BaseModel):
    """What a coordinator asks for (the form's fields, validated as hostile input)."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=200)
    purpose: str = Field(min_length=1, max_length=10_000)
    spokes: list[SpokeId] = Field(min_length=1, max_length=500)
    attributes: list[Attribute] = Field(default_factory=list, max_length=500)
    study_kinds: list[StudyKind] = Field(min_length=1, max_length=len(StudyKind))
    epsilon: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False)
    k: int | None = Field(None, ge=1, le=1_000_000)

    @field_validator("spokes", "attributes", "study_kinds")
    @classmethod
    def _unique(cls, values: list[str]) -> list[str]:
        return list(dict.fromkeys(values))


def conditions_digest(conditions: AccessConditions) -> str:
    """The digest members' approvals are compared by: equal conditions, equal digest."""
    text = json.dumps(conditions.model_dump(mode="json"), sort_keys=True,
                      separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def is_member(user: User) -> bool:
    return Role.COMMITTEE.value in user.roles


def may_read(user: User, request: AccessRequest) -> bool:
    """The request, its attachments and its history: its requester, the committee and
    administrators only (the purpose and the DPIA may describe the data in detail)."""
    return (user.username == request.requested_by or is_member(user)
            or Role.ADMIN.value in user.roles)


def create(session: Session, requester: User, spec: RequestSpec,
           files: list[CheckedFile]) -> AccessRequest:
    """File a request with both attachments; unknown spokes are refused."""
    unknown = [s for s in spec.spokes if session.get(Spoke, s) is None]
    if unknown:
        raise AccessError(f"unknown spokes: {', '.join(unknown)}")
    if sorted(f.kind for f in files) != sorted(KINDS):
        raise AccessError("attach the ethics approval and the DPIA (one file each)")
    if StudyKind.TRAINING in spec.study_kinds and spec.epsilon is None:
        raise AccessError("a request for training names the total ε it needs")
    request = AccessRequest(
        id=f"ar-{secrets.token_hex(6)}", title=spec.title, purpose=spec.purpose,
        requested_by=requester.username, spokes=list(spec.spokes),
        attributes=list(spec.attributes), study_kinds=[k.value for k in spec.study_kinds],
        epsilon=spec.epsilon, k=spec.k)
    session.add(request)
    session.flush()
    for f in files:
        session.add(AccessAttachment(request_id=request.id, kind=f.kind, digest=f.digest,
                                     filename=f.filename, media_type=f.media_type,
                                     size=len(f.content), content=f.content))
    audit.record(session, requester.username, "access.requested", request.id,
                 title=spec.title, spokes=request.spokes, attributes=request.attributes,
                 study_kinds=request.study_kinds, epsilon=spec.epsilon, k=spec.k,
                 attachments={f.kind: f.digest for f in files})
    return request


def _conditions(request: AccessRequest, body: AccessDecisionBody) -> AccessConditions:
    """The conditions of an approval, defaults from the request; never more than asked."""
    try:
        conditions = AccessConditions(
            spokes=body.spokes if body.spokes is not None else request.spokes,
            attributes=(body.attributes if body.attributes is not None
                        else request.attributes),
            study_kinds=(body.study_kinds if body.study_kinds is not None
                         else request.study_kinds),
            min_k=body.min_k or request.k or 5,
            epsilon_budget=(body.epsilon_budget if body.epsilon_budget is not None
                            else request.epsilon),
            expires_at=body.expires_at or utcnow() + DEFAULT_VALIDITY)
    except ValidationError as exc:
        raise AccessError("conditions: " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'conditions'}: {e['msg']}"
            for e in exc.errors()[:5])) from None
    beyond = [f"spoke {s}" for s in conditions.spokes if s not in request.spokes]
    beyond += [f"attribute {a}" for a in conditions.attributes if a not in request.attributes]
    beyond += [f"study kind {k.value}" for k in conditions.study_kinds
               if k.value not in request.study_kinds]
    if (conditions.epsilon_budget is not None and request.epsilon is not None
            and conditions.epsilon_budget > request.epsilon):
        beyond.append(f"ε {conditions.epsilon_budget} (requested {request.epsilon})")
    if beyond:
        raise AccessError("the committee grants no more than was requested: "
                          + ", ".join(beyond))
    if conditions.expires_at <= utcnow():
        raise AccessError("the approval's expiry date is in the past")
    return conditions


def decide(session: Session, request: AccessRequest, member: User,
           body: AccessDecisionBody, quorum: int) -> AccessRequest:
    """Record one member's decision; decide the request when the rule is met."""
    if Role.ADMIN.value in member.roles:
        raise AccessForbidden("administrators do not count as committee members; decide "
                              "with an account that is not an administrator")
    if not is_member(member):
        raise AccessForbidden(f"{member.username} is not a member of the data access "
                              "committee")
    if member.username == request.requested_by:
        raise AccessForbidden("the requester cannot decide on their own request")
    if request.state != AccessRequestState.SUBMITTED.value:
        raise AccessError(f"the request is already {request.state}")
    if session.exec(select(AccessVote).where(AccessVote.request_id == request.id,
                                             AccessVote.member == member.username)).first():
        raise AccessError(f"{member.username} already decided on this request")
    if body.decision == "refuse":
        if not body.reason.strip():
            raise AccessError("a refusal says why (reason)")
        session.add(AccessVote(request_id=request.id, member=member.username,
                               decision="refuse", reason=body.reason))
        request.state, request.refusal_reason = AccessRequestState.REFUSED.value, body.reason
        request.decided_at = utcnow()
        session.add(request)
        audit.record(session, member.username, "access.refused", request.id,
                     reason=body.reason)
        return request
    conditions = _conditions(request, body)
    digest = conditions_digest(conditions)
    session.add(AccessVote(request_id=request.id, member=member.username, decision="approve",
                           conditions=conditions.model_dump(mode="json"),
                           conditions_sha256=digest, reason=body.reason))
    audit.record(session, member.username, "access.vote.approve", request.id,
                 conditions=conditions.model_dump(mode="json"), conditions_sha256=digest,
                 reason=body.reason)
    session.flush()
    agreeing = session.exec(select(AccessVote.member).where(
        AccessVote.request_id == request.id, AccessVote.decision == "approve",
        AccessVote.conditions_sha256 == digest)).all()
    if len(set(agreeing)) >= quorum:
        request.state = AccessRequestState.APPROVED.value
        request.conditions = conditions.model_dump(mode="json")
        request.decided_at = utcnow()
        session.add(request)
        audit.record(session, "hub", "access.approved", request.id,
                     conditions=request.conditions, conditions_sha256=digest,
                     members=sorted(set(agreeing)), quorum=quorum)
    return request


def withdraw(session: Session, request: AccessRequest, user: User,
             reason: str) -> AccessRequest:
    """The requester withdraws (before or after a decision): no new launch under it.
    Studies already launched are not stopped by this; cancel them as usual."""
    if user.username != request.requested_by:
        raise AccessForbidden("only the requester can withdraw a request")
    if request.state in (AccessRequestState.REFUSED.value,
                         AccessRequestState.WITHDRAWN.value):
        raise AccessError(f"the request is already {request.state}")
    previous = request.state
    request.state, request.withdrawn_at = AccessRequestState.WITHDRAWN.value, utcnow()
    session.add(request)
    audit.record(session, user.username, "access.withdrawn", request.id, reason=reason,
                 previous_state=previous)
    return request


def visible_requests(session: Session, user: User) -> list[AccessRequest]:
    """Newest first: every request for the committee and administrators, else one's own."""
    query = select(AccessRequest).order_by(AccessRequest.created_at.desc())  # type: ignore[attr-defined]
    if not (is_member(user) or Role.ADMIN.value in user.roles):
        query = query.where(AccessRequest.requested_by == user.username)
    return list(session.exec(query))


def approved_for(session: Session, username: str) -> list[AccessRequest]:
    """The user's approved, unexpired requests: what a launch form offers."""
    now = utcnow()
    return [r for r in session.exec(select(AccessRequest).where(
        AccessRequest.requested_by == username,
        AccessRequest.state == AccessRequestState.APPROVED.value))
        if r.conditions and AccessConditions.model_validate(r.conditions).expires_at > now]


def epsilon_remaining(request: AccessRequest) -> float | None:
    if not request.conditions or request.conditions.get("epsilon_budget") is None:
        return None
    return max(0.0, float(request.conditions["epsilon_budget"]) - request.epsilon_spent)


def read(session: Session, request: AccessRequest) -> AccessRequestRead:
    attachments = session.exec(select(AccessAttachment).where(
        AccessAttachment.request_id == request.id).order_by(AccessAttachment.kind)).all()
    votes = session.exec(select(AccessVote).where(AccessVote.request_id == request.id)
                         .order_by(AccessVote.id)).all()  # type: ignore[arg-type]
    experiments = session.exec(select(Experiment.id).where(
        Experiment.access_request_id == request.id)).all()
    studies = session.exec(select(TrainingStudy.id).where(
        TrainingStudy.access_request_id == request.id)).all()
    psi_runs = session.exec(select(PsiRun.id).where(
        PsiRun.access_request_id == request.id)).all()
    vertical_studies = session.exec(select(VerticalStudy.id).where(
        VerticalStudy.access_request_id == request.id)).all()
    return AccessRequestRead(
        **request.model_dump(exclude={"conditions"}), conditions=request.conditions,
        epsilon_remaining=epsilon_remaining(request),
        attachments=[AccessAttachmentRead(kind=a.kind, filename=a.filename,
                                          media_type=a.media_type, size=a.size,
                                          digest=a.digest) for a in attachments],
        votes=[AccessVoteRead(member=v.member, decision=v.decision, reason=v.reason,
                              conditions_sha256=v.conditions_sha256, at=v.at) for v in votes],
        experiments=sorted(experiments), training_studies=sorted(studies),
        psi_runs=sorted(psi_runs), vertical_studies=sorted(vertical_studies))
