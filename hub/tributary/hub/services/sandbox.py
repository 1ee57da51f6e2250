"""The sandbox lane: a developer runs their own version, registered but not yet reviewed,
on the sandbox spokes (synthetic data only) to iterate on digests without reviews. The
hub signs a sandbox grant (a statement of its own type) naming the developer and the
publisher key that signed the release; sandbox spokes run it only with that key, and every
other spoke refuses it, since it is not an approval."""

from __future__ import annotations

import uuid
from datetime import timedelta

from jsonschema import Draft202012Validator
from sqlmodel import Session, select

from tributary.hub.models import Algorithm, Experiment, ExperimentTarget, Publisher, Spoke, utcnow
from tributary.hub.schemas import SandboxRunCreate
from tributary.hub.services import audit
from tributary.hub.services.aggregation import AGGREGATORS, validate_parameters
from tributary.hub.services.trust import publisher_keyid


class SandboxRefused(ValueError):
    """The try-out cannot be made (not the developer's version, no sandbox spoke, ...)."""


def create(session: Session, algorithm: Algorithm, developer: str, body: SandboxRunCreate,
           expiry: timedelta) -> tuple[Experiment, Publisher]:
    """A sandbox study of ``algorithm`` by its own registrant, targeting sandbox spokes
    only; returns it with the publisher whose key the grant names."""
    if algorithm.registered_by != developer:
        raise SandboxRefused(f"only the version's own developer ({algorithm.registered_by}) "
                             "can try it in the sandbox")
    if algorithm.revoked_at is not None:
        raise SandboxRefused("this version's approval was revoked; register a new version")
    keyid = publisher_keyid(algorithm)
    publisher = session.get(Publisher, keyid) if keyid else None
    if publisher is None:
        raise SandboxRefused("a sandbox run needs the version's release signature by a "
                             "registered publisher (publish with your key), so the sandbox "
                             "runs exactly the image you signed")
    errors = list(Draft202012Validator(algorithm.argument_schema).iter_errors(body.arguments))
    if errors:
        raise SandboxRefused("invalid arguments: " + "; ".join(
            f"{'/'.join(map(str, e.path)) or 'arguments'}: {e.message}" for e in errors[:5]))
    sandboxes = {s.id: s for s in session.exec(select(Spoke).where(
        Spoke.sandbox == True, Spoke.revoked_at == None))}  # noqa: E711, E712
    targets = body.spoke_ids or sorted(sandboxes)
    if not targets:
        raise SandboxRefused("this hub has no sandbox spoke (`tributary demo` starts one)")
    real = [s for s in targets if s not in sandboxes]
    if real:
        raise SandboxRefused(f"not sandbox spokes (a sandbox study runs on synthetic data "
                             f"only): {', '.join(real)}")
    aggregator, parameters = algorithm.aggregator, {}
    try:
        parameters = validate_parameters(aggregator, {})
    except ValueError:
        aggregator, parameters = "summary", {}
    if aggregator not in AGGREGATORS:
        aggregator = "summary"
    experiment = Experiment(
        id=f"exp-{uuid.uuid4().hex[:12]}",
        name=body.name or f"sandbox: {algorithm.name} {algorithm.version}",
        algorithm_id=algorithm.id or 0, arguments=body.arguments,
        cohort=body.cohort.model_dump(mode="json"), limits=body.limits.model_dump(mode="json"),
        release=[], aggregator=aggregator, aggregator_parameters=parameters,
        expires_at=utcnow() + expiry, sandbox=True, owner=developer)
    session.add(experiment)
    session.flush()
    for spoke_id in dict.fromkeys(targets):
        session.add(ExperimentTarget(experiment_id=experiment.id, spoke_id=spoke_id))
    audit.record(session, developer, "experiment.created", experiment.id, name=experiment.name,
                 algorithm=f"{algorithm.name} {algorithm.version}", spokes=targets,
                 sandbox=True)
    session.commit()
    return experiment, publisher
