"""Launching an experiment: one persistent, expiring message per target spoke, published
to that spoke's own queue. A launch interrupted by a broker outage can simply be repeated:
targets already published are skipped."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlmodel import Session, select

from tributary.hub.models import (
    Algorithm,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Spoke,
    TargetState,
    utcnow,
)
from tributary.hub.services import access_grants, audit, credentials
from tributary.hub.services.trust import (
    LaunchRefused,
    SpokeVerdict,
    limits_verdict,
    verdicts,
)
from tributary.protocol.broker import StompClient, publish_with_retry
from tributary.protocol.cohorts.access import AccessGrant, StudyKind
from tributary.protocol.destinations import spoke_queue
from tributary.protocol.messages import (
    AlgorithmRef,
    CohortSelection,
    ExperimentMessage,
    RunLimits,
)
from tributary.protocol.release import sign_sandbox_grant
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal


class NotApproved(ValueError):
    """The algorithm version has no valid approval: nothing may be launched with it."""


def algorithm_ref(algorithm: Algorithm,
                  approval: dict[str, Any] | None = None) -> AlgorithmRef:
    """The version as a spoke admits it: image pinned by digest, the publisher's release
    signature and the hub's approval (``approval`` replaces it: a sandbox grant). What a
    validation study's message and every training round's ``RoundOpen`` carry."""
    return AlgorithmRef(name=algorithm.name, version=algorithm.version,
                        repository=algorithm.repository, digest=algorithm.digest,
                        release_signature=algorithm.release_signature,
                        approval=approval or algorithm.approval)


def refuse_unapproved(algorithm: Algorithm | None, algorithm_id: int) -> Algorithm:
    """The version itself if it may be launched; else :class:`NotApproved` saying why."""
    if algorithm is None:
        raise NotApproved(f"no algorithm version {algorithm_id} is registered")
    if algorithm.revoked_at is not None:
        raise NotApproved(f"{algorithm.name} {algorithm.version} is revoked"
                          + (f": {algorithm.revoked_reason}" if algorithm.revoked_reason
                             else ""))
    if algorithm.approval is None:
        raise NotApproved(f"{algorithm.name} {algorithm.version} is not approved")
    return algorithm


def build_message(experiment: Experiment, algorithm: Algorithm, spoke_id: str,
                  approval: dict[str, Any] | None = None,
                  grant: AccessGrant | None = None) -> ExperimentMessage:
    """The message for one target; ``approval`` replaces the version's own approval (a
    sandbox grant, for a sandbox study); ``grant``: the access request it runs under."""
    return ExperimentMessage(
        experiment_id=experiment.id,
        spoke_id=spoke_id,
        algorithm=algorithm_ref(algorithm, approval),
        arguments=experiment.arguments,
        cohort=CohortSelection.model_validate(experiment.cohort),
        limits=RunLimits.model_validate(experiment.limits),
        release=experiment.release,
        expires_at=experiment.expires_at, access_request=grant,
    )


def sandbox_grant(key: SigningKey, algorithm: Algorithm, publisher_pem: str,
                  developer: str) -> dict[str, Any]:
    """The hub's leave for sandbox spokes to run this unreviewed version, signed with the
    publisher key the version's release signature verified with at registration."""
    return sign_sandbox_grant(key, algorithm.repository, algorithm.digest, {
        "name": algorithm.name, "version": algorithm.version, "developer": developer,
        "publisher": algorithm.publisher, "publisher_key_pem": publisher_pem,
        "granted_at": utcnow().isoformat()})


def check_targets(session: Session, experiment: Experiment, algorithm: Algorithm,
                  mode: str = "strict", membership: credentials.Policy | None = None) -> None:
    """Raise :class:`LaunchRefused` if a pending target would refuse the version, or is
    not a federation member by ``membership`` (its credential missing, expired, revoked),
    naming each one's reason; ``mode`` is the hub's ``launch_trust_check``."""
    pending = [t.spoke_id for t in session.exec(
        select(ExperimentTarget).where(ExperimentTarget.experiment_id == experiment.id))
        if t.state == TargetState.PENDING]
    if not pending:
        return
    refusals = [SpokeVerdict(spoke_id, spoke_id, False, reason, experiment.sandbox, "credential")
                for spoke_id, reason in credentials.refusals(session, membership,
                                                             pending).items()]
    for found in verdicts(session, algorithm, experiment.sandbox, pending):
        if found.runs:
            found = limits_verdict(session.get(Spoke, found.spoke_id),
                                   RunLimits.model_validate(experiment.limits)) or found
        if found.runs:
            continue
        if found.refusal == "unreported" and mode in ("off", "reported"):
            continue
        if found.refusal == "publisher" and mode == "off":
            continue
        refusals.append(found)
    if refusals:
        raise LaunchRefused(refusals)


def check_access(session: Session, experiment: Experiment, actor: str, required: bool,
                 k: int) -> AccessGrant | None:
    """Raise :class:`AccessRefused` if the experiment is not bound to an approved request
    of ``actor``'s when one is ``required``, or breaks its conditions (spokes, attributes,
    kind, ``k``: the hub's small-cell threshold); the grant its messages carry."""
    if experiment.sandbox:  # synthetic data on sandbox spokes: no access request
        return None
    spokes = list(session.exec(select(ExperimentTarget.spoke_id).where(
        ExperimentTarget.experiment_id == experiment.id)))
    request = access_grants.check(session, experiment.access_request_id, actor,
                                  access_grants.LaunchAsk(
                                      kind=StudyKind.VALIDATION, spokes=spokes,
                                      attributes=access_grants.experiment_attributes(
                                          experiment), k=k), required)
    return access_grants.grant(request)


def launch(session: Session, client: StompClient, key: SigningKey, experiment: Experiment,
           actor: str, expiry: timedelta, trust_check: str = "strict",
           approval: dict[str, Any] | None = None,
           membership: credentials.Policy | None = None, access_required: bool = False,
           k: int = 5) -> list[ExperimentTarget]:
    """Publish the experiment to its pending targets, once its access request allows it
    (:func:`check_access`) and :func:`check_targets` found that every one of them will run
    it and is a member (``membership``: the hub's credential policy). ``approval``: a
    sandbox study's grant."""
    algorithm = session.get(Algorithm, experiment.algorithm_id)
    assert algorithm is not None
    if experiment.sandbox:
        if approval is None:
            raise NotApproved("a sandbox study needs the hub's sandbox grant")
    else:
        refuse_unapproved(algorithm, experiment.algorithm_id)
    grant = check_access(session, experiment, actor, access_required, k)
    check_targets(session, experiment, algorithm, trust_check, membership)
    if experiment.expires_at is None:
        experiment.expires_at = utcnow() + expiry
        session.add(experiment)
    # Never hold a database write lock while waiting for the broker: the results consumer
    # (which must write to go on) shares the connection that brings the publish receipts.
    session.commit()
    targets = session.exec(
        select(ExperimentTarget).where(ExperimentTarget.experiment_id == experiment.id)
    ).all()
    for target in targets:
        if target.state != TargetState.PENDING:
            continue
        message = build_message(experiment, algorithm, target.spoke_id, approval, grant)
        headers = {"tributary-kind": message.kind,
                   "expires": str(int(experiment.expires_at.timestamp() * 1000))}
        queue = spoke_queue(target.spoke_id, client.settings.federation)
        publish_with_retry(client, queue, seal(message, key), headers)
        target.state = TargetState.PUBLISHED
        target.message_id = message.message_id
        target.published_at = target.updated_at = utcnow()
        session.add(target)
        audit.record(session, "hub", "message.sent", experiment.id, kind=message.kind,
                     spoke=target.spoke_id, message_id=message.message_id,
                     image=algorithm.repository, digest=algorithm.digest)
        session.commit()
    experiment.state = ExperimentState.LAUNCHED
    experiment.launched_at = experiment.launched_at or utcnow()
    session.add(experiment)
    audit.record(session, actor, "experiment.launched", experiment.id,
                 spokes=[t.spoke_id for t in targets],
                 access_request=experiment.access_request_id)
    session.commit()
    return list(targets)
