"""Experiments: define, launch, follow, read results and aggregates."""

import shutil
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from jsonschema import Draft202012Validator
from sqlmodel import Session, select

from tributary.hub.deps import (
    acting,
    case_reader,
    current_user,
    get_broker,
    get_or_404,
    get_session,
    get_settings,
)
from tributary.hub.models import (
    AccessRequest,
    Algorithm,
    CaseState,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Role,
    Spoke,
    utcnow,
)
from tributary.hub.schemas import (
    CancelBody,
    CaseRead,
    ExperimentCreate,
    ExperimentRead,
    RetryBody,
    RetryRead,
)
from tributary.hub.services import access_grants, audit, control, credentials, exports, lapse
from tributary.hub.services.access_grants import AccessRefused
from tributary.hub.services.aggregation import AGGREGATORS, validate_parameters
from tributary.hub.services.anchors import anchors
from tributary.hub.services.enrolment import active_keys
from tributary.hub.services.launch import NotApproved, launch
from tributary.hub.services.progress import (
    DEFAULT_CASE_LIMIT,
    MAX_CASE_LIMIT,
    case_page,
    experiment_reads,
)
from tributary.hub.services.progress import experiment_read as _experiment_read
from tributary.hub.services.trust import LaunchRefused
from tributary.hub.settings import HubSettings
from tributary.protocol.broker import PublishError, StompClient
from tributary.protocol.bundle import write_bundle, zip_bundle

router = APIRouter(prefix="/api/experiments", tags=["experiments"],
                   dependencies=[Depends(current_user)])


def experiment_read(session: Session, experiment: Experiment,
                    settings: HubSettings | None = None) -> ExperimentRead:
    if settings is None:
        return _experiment_read(session, experiment)
    return _experiment_read(session, experiment, settings.spoke_online_seconds)


#: How long a launch, cancel or retry waits for a broker that is reconnecting.
BROKER_WAIT_SECONDS = 5.0


def _broker_reachable(broker: StompClient, what: str) -> None:
    """Refuse at once, rather than hang the request, while the broker is unreachable;
    nothing has been sent and repeating the request later finishes the job."""
    if not broker.wait_connected(BROKER_WAIT_SECONDS):
        raise HTTPException(503, f"the broker is unreachable: {what} not sent; the hub "
                                 "reconnects by itself, repeat the request later")


def _get(session: Session, experiment_id: str) -> Experiment:
    return get_or_404(session, Experiment, experiment_id, "experiment")


@router.post("", status_code=201, response_model=ExperimentRead)
def create_experiment(body: ExperimentCreate, session: Session = Depends(get_session),
                      actor: str = Depends(acting(Role.COORDINATOR))) -> ExperimentRead:
    algorithm = session.get(Algorithm, body.algorithm_id)
    if algorithm is None:
        raise HTTPException(422, f"no algorithm with id {body.algorithm_id}")
    if algorithm.approval is None or algorithm.revoked_at is not None:
        state = "revoked" if algorithm.revoked_at else "not approved yet"
        raise HTTPException(422, f"{algorithm.name} {algorithm.version} is {state}")
    errors = sorted(Draft202012Validator(algorithm.argument_schema).iter_errors(body.arguments),
                    key=lambda e: list(e.path))
    if errors:
        detail = "; ".join(f"{'/'.join(map(str, e.path)) or 'arguments'}: {e.message}"
                           for e in errors[:5])
        raise HTTPException(422, f"invalid arguments for {algorithm.name}: {detail}")
    unknown = [s for s in body.spoke_ids if session.get(Spoke, s) is None]
    if unknown:
        raise HTTPException(422, f"unknown spokes: {', '.join(unknown)}")
    sandboxes = [s for s in body.spoke_ids if (found := session.get(Spoke, s)) and found.sandbox]
    if sandboxes:
        raise HTTPException(422, f"sandbox spokes run only sandbox studies (tributary "
                                 f"algorithm try): {', '.join(sandboxes)}")
    unenrolled = [s for s in body.spoke_ids if not active_keys(session, s)]
    if unenrolled:
        raise HTTPException(422, f"spokes without an enrolled key cannot be targeted: "
                                 f"{', '.join(unenrolled)}")
    if body.access_request_id is not None and session.get(
            AccessRequest, body.access_request_id) is None:
        raise HTTPException(422, f"no access request {body.access_request_id!r}")
    aggregator = body.aggregator or algorithm.aggregator
    if aggregator not in AGGREGATORS:
        raise HTTPException(422, f"unknown aggregator {aggregator!r}")
    try:
        parameters = validate_parameters(aggregator, body.aggregator_parameters)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    experiment = Experiment(
        id=f"exp-{uuid.uuid4().hex[:12]}", name=body.name, algorithm_id=body.algorithm_id,
        arguments=body.arguments, cohort=body.cohort.model_dump(mode="json"),
        limits=body.limits.model_dump(mode="json"), release=body.release, aggregator=aggregator,
        aggregator_parameters=parameters, access_request_id=body.access_request_id,
        expires_at=utcnow() + timedelta(days=body.expires_in_days)
        if body.expires_in_days else None,
    )
    session.add(experiment)
    session.flush()  # the targets reference it
    for spoke_id in dict.fromkeys(body.spoke_ids):
        session.add(ExperimentTarget(experiment_id=experiment.id, spoke_id=spoke_id))
    audit.record(session, actor, "experiment.created", experiment.id, name=body.name,
                 algorithm=f"{algorithm.name} {algorithm.version}", spokes=body.spoke_ids,
                 access_request=body.access_request_id)
    session.commit()
    return experiment_read(session, experiment)


@router.get("", response_model=list[ExperimentRead])
def list_experiments(session: Session = Depends(get_session),
                     settings: HubSettings = Depends(get_settings)) -> list[ExperimentRead]:
    return experiment_reads(session, settings.spoke_online_seconds)


@router.get("/{experiment_id}", response_model=ExperimentRead)
def get_experiment(experiment_id: str, session: Session = Depends(get_session),
                   settings: HubSettings = Depends(get_settings)) -> ExperimentRead:
    """The experiment with, per target spoke, its progress and what it is waiting for."""
    return experiment_read(session, _get(session, experiment_id), settings)


@router.post("/{experiment_id}/launch", response_model=ExperimentRead)
def launch_experiment(experiment_id: str, request: Request,
                      session: Session = Depends(get_session),
                      broker: StompClient = Depends(get_broker),
                      settings: HubSettings = Depends(get_settings),
                      actor: str = Depends(acting(Role.COORDINATOR))) -> ExperimentRead:
    experiment = _get(session, experiment_id)
    if experiment.state in (ExperimentState.COMPLETED, ExperimentState.CANCELLED):
        raise HTTPException(409, f"experiment already {experiment.state.value}")
    _broker_reachable(broker, "experiment messages")
    try:
        launch(session, broker, request.app.state.signing_key, experiment, actor,
               timedelta(days=settings.default_expiry_days), settings.launch_trust_check,
               membership=credentials.policy(settings),
               access_required=settings.require_access_requests, k=settings.min_cell_size)
    except NotApproved as exc:
        raise HTTPException(409, f"cannot launch: {exc}") from None
    except AccessRefused as exc:
        session.rollback()
        audit.record(session, actor, "experiment.launch_refused", experiment.id,
                     access_request=experiment.access_request_id, condition=exc.condition,
                     reason=exc.reason)
        session.commit()
        raise HTTPException(409, exc.detail()) from None
    except LaunchRefused as exc:
        audit.record(session, actor, "experiment.launch_refused", experiment.id,
                     refusals=exc.detail()["refusals"])
        session.commit()
        raise HTTPException(409, exc.detail()) from None
    except PublishError as exc:
        raise HTTPException(503, f"broker unavailable, launch incomplete (retry to finish "
                                 f"it): {exc}") from None
    return experiment_read(session, experiment, settings)


@router.post("/{experiment_id}/cancel", response_model=ExperimentRead)
def cancel_experiment(experiment_id: str, request: Request, body: CancelBody | None = None,
                      session: Session = Depends(get_session),
                      broker: StompClient = Depends(get_broker),
                      settings: HubSettings = Depends(get_settings),
                      actor: str = Depends(acting(Role.COORDINATOR))) -> ExperimentRead:
    """Stop the experiment at every spoke: queued cases are cancelled now, running ones are
    stopped by their spoke, which confirms. Repeat the call to re-send after an outage."""
    experiment = _get(session, experiment_id)
    reason = (body or CancelBody()).reason
    _broker_reachable(broker, "cancellations")
    try:
        control.cancel(session, broker, request.app.state.signing_key, experiment, actor,
                       reason, timedelta(days=settings.default_expiry_days))
    except control.NotAllowed as exc:
        raise HTTPException(409, f"cannot cancel: {exc}") from None
    except PublishError as exc:
        raise HTTPException(503, f"broker unavailable, cancellation incomplete (repeat the "
                                 f"request to finish it): {exc}") from None
    return experiment_read(session, experiment, settings)


@router.post("/{experiment_id}/retry", response_model=RetryRead)
def retry_cases(experiment_id: str, request: Request, body: RetryBody | None = None,
                session: Session = Depends(get_session),
                broker: StompClient = Depends(get_broker),
                settings: HubSettings = Depends(get_settings),
                actor: str = Depends(acting(Role.COORDINATOR))) -> RetryRead:
    """Run failed cases again as their next attempt (all failed cases unless ``case_ids``
    names some); every attempt stays on record under the case."""
    experiment = _get(session, experiment_id)
    body = body or RetryBody()
    _broker_reachable(broker, "retry requests")
    try:
        requested = control.retry(session, broker, request.app.state.signing_key, experiment,
                                  actor, body.case_ids, body.spoke_ids, body.reason,
                                  timedelta(days=settings.default_expiry_days))
    except control.NotAllowed as exc:
        raise HTTPException(409, f"cannot retry: {exc}") from None
    except PublishError as exc:
        raise HTTPException(503, f"broker unavailable, retry incomplete (repeat the request "
                                 f"for the cases still failed): {exc}") from None
    return RetryRead(experiment_id=experiment_id, requested=requested)


@router.get("/{experiment_id}/cases", response_model=list[CaseRead])
def list_cases(experiment_id: str, request: Request, response: Response,
               limit: int = Query(DEFAULT_CASE_LIMIT, ge=1, le=MAX_CASE_LIMIT),
               cursor: str | None = Query(None, max_length=2000),
               spoke: str | None = Query(None, max_length=200),
               state: CaseState | None = None,
               failure_reason: str | None = Query(None, max_length=200),
               session: Session = Depends(get_session),
               _reader: str = Depends(case_reader)) -> list[CaseRead]:
    """One page of cases in (spoke, case) order, each with its latest result, live progress
    while it runs, and the history of its attempts (per-case data: coordinators only).
    Filter by ``spoke``, ``state`` and ``failure_reason``; the next page's address is in
    the ``Link: <...>; rel="next"`` header (and its cursor in ``X-Next-Cursor``), absent on
    the last page."""
    _get(session, experiment_id)
    try:
        page = case_page(session, experiment_id, limit, cursor, spoke,
                         state.value if state else None, failure_reason)
    except ValueError:
        raise HTTPException(422, "invalid cursor: use the one the previous page gave") from None
    if page.next_cursor:
        url = request.url.include_query_params(cursor=page.next_cursor)
        response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
        response.headers["X-Next-Cursor"] = page.next_cursor
    return page.cases


@router.get("/{experiment_id}/custody-gaps")
def list_custody_gaps(experiment_id: str,
                      session: Session = Depends(get_session)) -> list[dict[str, Any]]:
    """Custody gaps accepted as lost at this experiment's spokes (also in its bundle)."""
    _get(session, experiment_id)
    return exports.custody_gaps(session, experiment_id)


@router.get("/{experiment_id}/bundle", response_class=FileResponse)
def export_bundle(experiment_id: str, request: Request, background: BackgroundTasks,
                  session: Session = Depends(get_session),
                  actor: str = Depends(acting(Role.COORDINATOR))) -> FileResponse:
    """The study bundle (zip): results, custody records, hub-signed manifest; verifiable
    offline with ``tributary bundle verify``."""
    experiment = _get(session, experiment_id)
    read = experiment_read(session, experiment).model_dump(mode="json")
    read["custody_gaps"] = exports.custody_gaps(session, experiment_id)  # accepted as lost
    read["withdrawals"] = lapse.bundle_record(session, experiment_id)  # lapsed members
    read["access_request"] = access_grants.bundle_record(session,
                                                         experiment.access_request_id)
    workdir = Path(tempfile.mkdtemp(prefix="tributary-bundle-"))
    held = anchors(session, [t.spoke_id for t in session.exec(select(ExperimentTarget).where(
        ExperimentTarget.experiment_id == experiment_id))])
    counted: list[int] = []  # the cases stream from the database, a chunk at a time
    try:
        folder = write_bundle(workdir / experiment_id, read,
                              exports.iter_bundle_cases(request.app.state.engine, experiment_id,
                                                        counted),
                              request.app.state.signing_key, held)
        archive = zip_bundle(folder, workdir / f"{experiment_id}.zip")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    audit.record(session, actor, "bundle.exported", experiment_id, results=counted[0])
    session.commit()
    background.add_task(shutil.rmtree, workdir, True)
    return FileResponse(archive, media_type="application/zip",
                        filename=f"tributary-{experiment_id}.zip")
