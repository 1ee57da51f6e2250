"""Federated training studies: launch (coordinators), list and read (any signed-in user).

The JSON of ``GET /api/training-studies/{id}`` (:class:`TrainingStudyDetail`) is what the
dashboard and ``tributary training show|watch`` read; its fields are documented in
docs/training.md and only grow. The round loop itself runs in the hub's training service
(:mod:`tributary.hub.training_coordinator`), which picks up a launched study on its next
pass."""

from __future__ import annotations

import base64
import binascii
import hashlib

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlmodel import Session

from tributary.hub.deps import acting, current_user, get_or_404, get_session, get_settings
from tributary.hub.models import Role, TrainingStudy
from tributary.hub.schemas import (
    MAX_INITIAL_MODEL_BYTES,
    TrainingStudyCreate,
    TrainingStudyDetail,
    TrainingStudyRead,
)
from tributary.hub.services import credentials, training, training_reads
from tributary.hub.services.access_grants import AccessRefused
from tributary.hub.settings import HubSettings
from tributary.protocol.objects import ObjectStore, ObjectStoreError
from tributary.protocol.training.tensors import decode_tensors

router = APIRouter(prefix="/api/training-studies", tags=["training"],
                   dependencies=[Depends(current_user)])


def _store(request: Request, settings: HubSettings) -> ObjectStore:
    store = getattr(request.app.state, "training_store", None)
    if store is None:
        if settings.objectstore_credentials is None:
            raise HTTPException(503, "this hub has no object store configured "
                                     "(TRIBUTARY_HUB_OBJECTSTORE_CREDENTIALS): no training")
        store = request.app.state.training_store = ObjectStore.from_file(
            settings.objectstore_credentials)
    return store


def _initial_model(body: TrainingStudyCreate) -> tuple[bytes, str]:
    """The initial model's bytes and digest, read as hostile input (the safetensors reader
    refuses before allocating: size, header, dtypes, NaN...)."""
    try:
        data = base64.b64decode(body.initial_model_b64, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "initial_model_b64 is not base64") from None
    if len(data) > MAX_INITIAL_MODEL_BYTES:
        raise HTTPException(413, f"the initial model is over {MAX_INITIAL_MODEL_BYTES} bytes")
    try:
        tensors = decode_tensors(data)
    except ValueError as exc:
        raise HTTPException(422, f"the initial model is not a valid safetensors file: {exc}"
                            ) from None
    if not tensors:
        raise HTTPException(422, "the initial model holds no tensor")
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


@router.post("", status_code=201, response_model=TrainingStudyDetail)
def launch_study(body: TrainingStudyCreate, request: Request,
                 session: Session = Depends(get_session),
                 settings: HubSettings = Depends(get_settings),
                 actor: str = Depends(acting(Role.COORDINATOR))) -> TrainingStudyDetail:
    """Launch a training study: every spoke must be registered, enrolled (an active key)
    and not revoked, and the algorithm version registered, approved and not revoked (409,
    audited), else nothing is created and each refusal says why. The initial model is
    stored content-addressed; the hub's training service opens round 0."""
    refusals = training_reads.spoke_refusals(session, body.spokes)
    if refusals:
        raise HTTPException(422, {"message": "spokes that cannot take part in training",
                                  "refusals": [{"spoke_id": s, "reason": r}
                                               for s, r in sorted(refusals.items())]})
    listed = credentials.refuse_non_members(session, settings, body.spokes, actor,
                                            "training.launch_refused", body.name)
    if listed:  # not federation members now: refused, audited, nothing created
        raise HTTPException(409, {"message": "spokes whose membership credential is refused",
                                  "refusals": listed})
    data, digest = _initial_model(body)
    spec = training.StudySpec(**body.model_dump(exclude={"initial_model_b64"}),
                              initial_model=digest)
    try:
        study = training.launch(session, spec, actor, settings.require_access_requests)
    except training.AlgorithmRefused as exc:
        session.commit()  # the refusal's audit event
        raise HTTPException(409, f"cannot launch: {exc}") from None
    except AccessRefused as exc:
        session.commit()  # the refusal's audit event (nothing else was changed)
        raise HTTPException(409, exc.detail()) from None
    except training.TrainingError as exc:
        raise HTTPException(422, str(exc)) from None
    store = _store(request, settings)  # uncommitted until the model is stored
    try:
        store.put(training.model_location(study.id, 0, digest), data)
    except ObjectStoreError as exc:
        session.rollback()
        raise HTTPException(503, f"the object store refused the initial model: {exc}"
                            ) from None
    session.commit()
    session.refresh(study)
    return training_reads.study_detail(session, study)


@router.get("", response_model=list[TrainingStudyRead])
def list_studies(session: Session = Depends(get_session)) -> list[TrainingStudyRead]:
    return training_reads.study_reads(session)


@router.get("/{study_id}", response_model=TrainingStudyDetail)
def get_study(study_id: str, session: Session = Depends(get_session)) -> TrainingStudyDetail:
    """The study and its rounds: stage, participants, joined spokes with their sample
    counts, survivors, dropouts, ε per round and cumulative, mean local loss."""
    study = get_or_404(session, TrainingStudy, study_id, "training study")
    return training_reads.study_detail(session, study)
