"""Review and approval of algorithm versions. The federation's rule (by default: approvals
from two reviewers of two organisations, none of them the registrant, its organisation or an
administrator; organisations compared as records, by id) must be met before
the hub signs an approval statement for the exact digest; spokes run nothing without it."""

from __future__ import annotations

from sqlmodel import Session, select

from tributary.hub.models import Algorithm, Review, Role, SpokeKey, User, utcnow
from tributary.hub.services import audit
from tributary.hub.services.registry_client import publish_attestation, withdraw_attestations
from tributary.hub.services.users import organisation_of
from tributary.hub.settings import HubSettings
from tributary.protocol.broker import StompClient, publish_with_retry
from tributary.protocol.destinations import spoke_queue
from tributary.protocol.messages import ApprovalRevokedMessage
from tributary.protocol.registry import RegistryError
from tributary.protocol.release import APPROVAL_PREDICATE_TYPE, sign_approval
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal


class ReviewError(ValueError):
    pass


def review(session: Session, algorithm: Algorithm, reviewer: User, decision: str,
           comment: str, settings: HubSettings, hub_key: SigningKey) -> Algorithm:
    if algorithm.revoked_at is not None:
        raise ReviewError("this version's approval was revoked; register a new version")
    if reviewer.username == algorithm.registered_by:
        raise ReviewError("the registrant of an algorithm cannot review it")
    if Role.ADMIN in reviewer.roles:
        # One administrator can create any number of accounts: none of them may count.
        raise ReviewError("administrators do not count as reviewers; review with an "
                          "account that is not an administrator")
    organisation = organisation_of(session, reviewer)
    if organisation is None:
        raise ReviewError("reviewers must belong to an organisation")
    registrant = session.get(User, algorithm.registered_by)
    if registrant is not None and registrant.organisation_id == organisation.id:
        raise ReviewError(f"the registrant's organisation ({organisation.name}) cannot "
                          "review its own version")
    existing = session.exec(select(Review).where(Review.algorithm_id == algorithm.id,
                                                 Review.reviewer == reviewer.username)).first()
    if existing is not None:
        raise ReviewError(f"{reviewer.username} already reviewed this version")
    session.add(Review(algorithm_id=algorithm.id or 0, reviewer=reviewer.username,
                       organisation=organisation.name, organisation_id=organisation.id,
                       decision=decision, comment=comment))
    audit.record(session, reviewer.username, f"algorithm.review.{decision}",
                 f"{algorithm.name} {algorithm.version}", digest=algorithm.digest,
                 organisation=organisation.name, organisation_id=organisation.id)
    session.flush()
    reviews = session.exec(select(Review).where(Review.algorithm_id == algorithm.id)).all()
    # Counted by identity, and only reviews recorded against an organisation record.
    approving = [r for r in reviews if r.decision == "approve" and r.organisation_id]
    rejected = any(r.decision == "reject" for r in reviews)
    rule = {"min_reviewers": settings.review_min_reviewers,
            "min_organisations": settings.review_min_organisations}
    if (algorithm.approval is None and not rejected
            and len({r.reviewer for r in approving}) >= settings.review_min_reviewers
            and len({r.organisation_id for r in approving}) >= settings.review_min_organisations):
        algorithm.approved_at = utcnow()
        algorithm.approval = sign_approval(hub_key, algorithm.repository, algorithm.digest, {
            "name": algorithm.name, "version": algorithm.version,
            "approved_at": algorithm.approved_at.isoformat(), "rule": rule,
            "reviewers": [{"reviewer": r.reviewer, "organisation": r.organisation}
                          for r in approving]})
        session.add(algorithm)
        audit.record(session, "hub", "algorithm.approved", f"{algorithm.name} "
                     f"{algorithm.version}", digest=algorithm.digest, rule=rule)
        if settings.publish_attestations:
            _publish_approval(session, algorithm, settings)
    session.commit()
    session.refresh(algorithm)
    return algorithm


def _publish_approval(session: Session, algorithm: Algorithm, settings: HubSettings) -> None:
    """Store the approval beside the image in the registry (cosign's attestation layout).
    Best effort: spokes get the approval in the signed experiment message anyway."""
    assert algorithm.approval is not None
    image = f"{algorithm.repository}@{algorithm.digest}"
    try:
        where = publish_attestation(algorithm.repository, algorithm.digest, algorithm.approval,
                                    APPROVAL_PREDICATE_TYPE, settings)
    except (RegistryError, ValueError) as exc:
        audit.record(session, "hub", "attestation.publish_failed", image, reason=str(exc))
        return
    audit.record(session, "hub", "attestation.published", image,
                 predicate_type=APPROVAL_PREDICATE_TYPE, manifest=where)


def revoke(session: Session, algorithm: Algorithm, actor: str, reason: str,
           settings: HubSettings) -> Algorithm:
    if algorithm.revoked_at is None:
        algorithm.revoked_at = utcnow()
        algorithm.revoked_reason = reason
        session.add(algorithm)
        audit.record(session, actor, "algorithm.revoked", f"{algorithm.name} "
                     f"{algorithm.version}", digest=algorithm.digest, reason=reason)
        session.commit()
        session.refresh(algorithm)
    if settings.publish_attestations and algorithm.approved_at is not None:
        # Also on a repeated call: a registry that was away the first time is caught up.
        _withdraw_approval(session, algorithm, settings)
        session.commit()
    return algorithm


def _withdraw_approval(session: Session, algorithm: Algorithm, settings: HubSettings) -> None:
    """Take the approval statement out of the registry, so that someone checking the image
    with cosign (or `tributary algorithm verify`) no longer finds it approved. The release
    signatures stay. Best effort, audited either way."""
    image = f"{algorithm.repository}@{algorithm.digest}"
    try:
        removed = withdraw_attestations(algorithm.repository, algorithm.digest,
                                        APPROVAL_PREDICATE_TYPE, settings)
    except (RegistryError, ValueError) as exc:
        audit.record(session, "hub", "attestation.withdraw_failed", image, reason=str(exc))
        return
    if removed:
        audit.record(session, "hub", "attestation.withdrawn", image,
                     predicate_type=APPROVAL_PREDICATE_TYPE, removed=removed)


def notify_revocation(session: Session, client: StompClient, hub_key: SigningKey,
                      algorithm: Algorithm) -> list[str]:
    """Tell every enrolled spoke, ahead of anything waiting in its queue, that this digest
    may no longer run. Returns the spokes told; raises PublishError if the broker fails."""
    spokes = sorted({k.spoke_id for k in session.exec(
        select(SpokeKey).where(SpokeKey.revoked_at == None))})  # noqa: E711
    for spoke_id in spokes:
        message = ApprovalRevokedMessage(spoke_id=spoke_id, name=algorithm.name,
                                         version=algorithm.version, digest=algorithm.digest,
                                         reason=algorithm.revoked_reason or "revoked")
        queue = spoke_queue(spoke_id, client.settings.federation)
        publish_with_retry(client, queue, seal(message, hub_key),
                           {"tributary-kind": message.kind, "priority": "9"})
        audit.record(session, "hub", "message.sent", spoke_id, kind=message.kind,
                     message_id=message.message_id, digest=algorithm.digest)
    session.commit()
    return spokes
