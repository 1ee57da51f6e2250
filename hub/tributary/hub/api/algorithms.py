"""Algorithm versions, always pinned by manifest digest."""

import re
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from jsonschema import Draft202012Validator, SchemaError
from sqlmodel import Session, select

from tributary.hub.deps import (
    RowId,
    acting,
    current_user,
    get_or_404,
    get_session,
    get_settings,
    require,
)
from tributary.hub.models import Algorithm, Publisher, Review, Role, User
from tributary.hub.schemas import (
    AlgorithmCreate,
    ExperimentRead,
    PublisherCreate,
    ReviewCreate,
    RevokeBody,
    SandboxRunCreate,
    SpokeTrustRead,
)
from tributary.hub.services import algorithms, approval, audit, credentials, sandbox, trust
from tributary.hub.services import launch as launch_service
from tributary.hub.services.aggregation import AGGREGATORS
from tributary.hub.services.progress import experiment_read
from tributary.hub.services.registry_client import RegistryCheckError, verify_manifest
from tributary.hub.settings import HubSettings
from tributary.protocol.broker import PublishError
from tributary.protocol.release import verify_release
from tributary.protocol.signing import PublicKey, SignatureError, envelope_signer

#: A registration that succeeded but deserves the registrant's attention.
NOTICE_HEADER = "X-Tributary-Notice"

router = APIRouter(prefix="/api/algorithms", tags=["algorithms"],
                   dependencies=[Depends(current_user)])


@router.post("", status_code=201, response_model=Algorithm)
def register_algorithm(body: AlgorithmCreate, response: Response,
                       session: Session = Depends(get_session),
                       settings: HubSettings = Depends(get_settings),
                       actor: str = Depends(acting(Role.DEVELOPER))) -> Algorithm:
    """Register a version pinned by digest. Refused: an unknown aggregator, an invalid
    argument schema, a name and version that exist, an image the registry does not serve,
    a release signature by an unregistered key or whose statement names another digest,
    name or version. Accepted with a notice (header ``X-Tributary-Notice``, audited): an
    image already registered as another version of the algorithm."""
    if body.aggregator not in AGGREGATORS:
        raise HTTPException(422, f"unknown aggregator {body.aggregator!r}; "
                                 f"known: {sorted(AGGREGATORS)}")
    try:
        Draft202012Validator.check_schema(body.argument_schema)
    except SchemaError as exc:
        raise HTTPException(422, f"argument_schema is not a valid JSON Schema: "
                                 f"{exc.message}") from None
    existing = session.exec(select(Algorithm).where(
        Algorithm.name == body.name, Algorithm.version == body.version)).first()
    if existing is not None:
        raise HTTPException(409, f"{body.name} {body.version} is already registered")
    same_image = session.exec(select(Algorithm).where(
        Algorithm.name == body.name, Algorithm.digest == body.digest)).first()
    if settings.verify_registry:
        try:
            verify_manifest(body.repository, body.digest, settings)
        except RegistryCheckError as exc:
            audit.record(session, actor, "algorithm.refused", f"{body.name} {body.version}",
                         reason=str(exc))
            session.commit()
            raise HTTPException(422, f"image refused: {exc}") from None
    publisher = None
    if body.release_signature is not None:
        publisher = _check_release(session, body, actor)
    elif settings.require_release_signature:
        audit.record(session, actor, "algorithm.refused", f"{body.name} {body.version}",
                     reason="unsigned image")
        session.commit()
        raise HTTPException(422, "image refused: no publisher release signature")
    algorithm = Algorithm(**body.model_dump(), publisher=publisher, registered_by=actor)
    session.add(algorithm)
    notice = {}
    if same_image is not None:  # allowed (a re-label), but never silently
        notice["same_image_as"] = f"{body.name} {same_image.version} (id {same_image.id})"
        # A header carries printable ASCII only; the name is the registrant's text.
        response.headers[NOTICE_HEADER] = re.sub(r"[^\x20-\x7e]", "?", (
            f"the image {body.digest} is already registered as {notice['same_image_as']}: "
            "this version runs exactly the same code"))
    audit.record(session, actor, "algorithm.registered", f"{body.name} {body.version}",
                 repository=body.repository, digest=body.digest, **notice)
    session.commit()
    session.refresh(algorithm)
    return algorithm


def _check_release(session: Session, body: AlgorithmCreate, actor: str) -> str:
    """Verify the release signature against the registered publishers; returns the name."""
    assert body.release_signature is not None
    publishers = list(session.exec(select(Publisher)))
    try:
        keyid = envelope_signer(body.release_signature)
        match = next((p for p in publishers if p.keyid == keyid), None)
        if match is None:
            raise SignatureError("signed by a key that is not a registered publisher")
        predicate = verify_release(body.release_signature,
                                   [PublicKey.from_pem(match.public_key_pem)], body.digest)
        _same_release(predicate, body)
    except SignatureError as exc:
        audit.record(session, actor, "algorithm.refused", f"{body.name} {body.version}",
                     reason=f"release signature: {exc}")
        session.commit()
        raise HTTPException(422, f"image refused: release signature {exc}") from None
    return match.name


def _same_release(predicate: dict[str, Any], body: AlgorithmCreate) -> None:
    """The signed statement names the algorithm and version being registered: a signature
    for "demo 1" must not vouch for the same image registered as "demo 2" or "other 1"."""
    signed = (predicate.get("name"), predicate.get("version"))
    if signed != (body.name, body.version):
        raise SignatureError(f"names {signed[0]} {signed[1]}, not {body.name} {body.version} "
                             f"(sign the release with --name {body.name} --version "
                             f"{body.version})")


@router.post("/{algorithm_id}/reviews", response_model=Algorithm)
def review_algorithm(algorithm_id: RowId, body: ReviewCreate, request: Request,
                     session: Session = Depends(get_session),
                     settings: HubSettings = Depends(get_settings),
                     user: User = Depends(require(Role.REVIEWER))) -> Algorithm:
    """Approve or reject a version; the hub signs an approval once the rule is met."""
    algorithm = get_algorithm(algorithm_id, session)
    try:
        return approval.review(session, algorithm, user, body.decision, body.comment, settings,
                               request.app.state.signing_key)
    except approval.ReviewError as exc:
        raise HTTPException(409, str(exc)) from None


@router.get("/{algorithm_id}/reviews", response_model=list[Review])
def list_reviews(algorithm_id: RowId, session: Session = Depends(get_session)) -> list[Review]:
    return algorithms.reviews(session, algorithm_id)


@router.post("/{algorithm_id}/revoke", response_model=Algorithm)
def revoke_algorithm(algorithm_id: RowId, body: RevokeBody, request: Request,
                     session: Session = Depends(get_session),
                     settings: HubSettings = Depends(get_settings),
                     actor: str = Depends(acting(Role.COORDINATOR))) -> Algorithm:
    """Withdraw an approval: no new experiment may use this version, and every enrolled
    spoke is told to refuse experiments with it that are already waiting in its queue, and
    the hub's approval statement is taken out of the registry. Calling it again re-sends
    the notice and retries the registry (after an outage, say)."""
    algorithm = approval.revoke(session, get_algorithm(algorithm_id, session), actor,
                                body.reason, settings)
    try:
        approval.notify_revocation(session, request.app.state.broker,
                                   request.app.state.signing_key, algorithm)
    except PublishError as exc:
        raise HTTPException(503, f"revoked at the hub, but the spokes could not all be "
                                 f"told ({exc}); call again to re-send") from None
    session.refresh(algorithm)  # the notice's commit expired it
    return algorithm


@router.get("/{algorithm_id}/trust", response_model=list[SpokeTrustRead])
def spoke_trust(algorithm_id: RowId, session: Session = Depends(get_session)
                ) -> list[SpokeTrustRead]:
    """Which spokes will run this version and, for the others, why not: from the publisher
    trust each spoke reports in its heartbeats, its enrolment and revocation."""
    algorithm = get_algorithm(algorithm_id, session)
    return [SpokeTrustRead(spoke_id=v.spoke_id, name=v.name, runs=v.runs, reason=v.reason,
                           sandbox=v.sandbox) for v in trust.verdicts(session, algorithm)]


@router.post("/{algorithm_id}/try", status_code=201, response_model=ExperimentRead)
def try_in_sandbox(algorithm_id: RowId, request: Request, body: SandboxRunCreate | None = None,
                   session: Session = Depends(get_session),
                   settings: HubSettings = Depends(get_settings),
                   actor: str = Depends(acting(Role.DEVELOPER))) -> ExperimentRead:
    """Run your own version, reviewed or not, on the sandbox spokes (synthetic data only):
    a sandbox study, launched at once, whose cases and log tails you can read. Real spokes
    are never targeted and would refuse it."""
    broker = request.app.state.broker
    algorithm = get_algorithm(algorithm_id, session)
    expiry = timedelta(days=1)
    try:
        experiment, publisher = sandbox.create(session, algorithm, actor,
                                               body or SandboxRunCreate(), expiry)
    except sandbox.SandboxRefused as exc:
        raise HTTPException(409, f"cannot try: {exc}") from None
    if not broker.wait_connected(5.0):
        raise HTTPException(503, f"the broker is unreachable: {experiment.id} created but "
                                 "not sent; try again once the broker is back")
    grant = launch_service.sandbox_grant(request.app.state.signing_key, algorithm,
                                         publisher.public_key_pem, actor)
    try:
        launch_service.launch(session, broker, request.app.state.signing_key, experiment,
                              actor, expiry, settings.launch_trust_check, approval=grant,
                              membership=credentials.policy(settings))
    except trust.LaunchRefused as exc:
        audit.record(session, actor, "experiment.launch_refused", experiment.id,
                     refusals=exc.detail()["refusals"])
        session.commit()
        raise HTTPException(409, exc.detail()) from None
    except PublishError as exc:
        raise HTTPException(503, f"broker unavailable, {experiment.id} not sent: {exc}"
                            ) from None
    return experiment_read(session, experiment, settings.spoke_online_seconds)


@router.get("", response_model=list[Algorithm])
def list_algorithms(session: Session = Depends(get_session)) -> list[Algorithm]:
    return algorithms.algorithms(session)


@router.get("/{algorithm_id}", response_model=Algorithm)
def get_algorithm(algorithm_id: RowId, session: Session = Depends(get_session)) -> Algorithm:
    return get_or_404(session, Algorithm, algorithm_id, "algorithm")


publishers_router = APIRouter(prefix="/api/publishers", tags=["algorithms"],
                             dependencies=[Depends(current_user)])


@publishers_router.post("", status_code=201, response_model=Publisher)
def register_publisher(body: PublisherCreate, session: Session = Depends(get_session),
                       actor: str = Depends(acting(Role.ADMIN))) -> Publisher:
    """Register a publisher's public key; its release signatures are then accepted."""
    try:
        key = PublicKey.from_pem(body.public_key_pem)
    except SignatureError as exc:
        raise HTTPException(422, str(exc)) from None
    if session.get(Publisher, key.keyid) is not None:
        raise HTTPException(409, "this key is already registered")
    publisher = Publisher(keyid=key.keyid, name=body.name, public_key_pem=key.pem)
    session.add(publisher)
    audit.record(session, actor, "publisher.registered", body.name, keyid=key.keyid)
    session.commit()
    session.refresh(publisher)
    return publisher


@publishers_router.get("", response_model=list[Publisher])
def list_publishers(session: Session = Depends(get_session)) -> list[Publisher]:
    return list(session.exec(select(Publisher).order_by(Publisher.name)))
