"""Launching an experiment: one persistent, expiring message per target spoke, published
to that spoke's own queue. A launch interrupted by a broker outage can simply be repeated:
targets already published are skipped."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session, select

from tributary.hub.models import (
    Algorithm,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    TargetState,
    utcnow,
)
from tributary.hub.services import audit
from tributary.protocol.broker import StompClient, publish_with_retry
from tributary.protocol.destinations import spoke_queue
from tributary.protocol.messages import (
    AlgorithmRef,
    CohortSelection,
    ExperimentMessage,
    RunLimits,
)
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal


class NotApproved(ValueError):
    """The algorithm version has no valid approval: nothing may be launched with it."""


def build_message(experiment: Experiment, algorithm: Algorithm, spoke_id: str) -> ExperimentMessage:
    return ExperimentMessage(
        experiment_id=experiment.id,
        spoke_id=spoke_id,
        algorithm=AlgorithmRef(name=algorithm.name, version=algorithm.version,
                               repository=algorithm.repository, digest=algorithm.digest,
                               release_signature=algorithm.release_signature,
                               approval=algorithm.approval),
        arguments=experiment.arguments,
        cohort=CohortSelection.model_validate(experiment.cohort),
        limits=RunLimits.model_validate(experiment.limits),
        release=experiment.release,
        expires_at=experiment.expires_at,
    )


def launch(session: Session, client: StompClient, key: SigningKey, experiment: Experiment,
           actor: str, expiry: timedelta) -> list[ExperimentTarget]:
    algorithm = session.get(Algorithm, experiment.algorithm_id)
    assert algorithm is not None
    if algorithm.approval is None or algorithm.revoked_at is not None:
        raise NotApproved(f"{algorithm.name} {algorithm.version} is "
                          f"{'revoked' if algorithm.revoked_at else 'not approved'}")
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
        message = build_message(experiment, algorithm, target.spoke_id)
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
                 spokes=[t.spoke_id for t in targets])
    session.commit()
    return list(targets)
