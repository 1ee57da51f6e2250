"""A training study's models out of the hub: the provenance (signed by the hub), any
global model as safetensors read back from the object store and refused unless it is still
the model the rounds recorded, and the study's bundle (verifiable offline with
``tributary bundle verify``). ``tributary training export`` uses these."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from sqlmodel import Session

from tributary.hub.deps import acting, current_user, get_session
from tributary.hub.models import Role, TrainingStudy
from tributary.hub.services import audit, training_export
from tributary.protocol.bundle import zip_bundle
from tributary.protocol.objects import ObjectNotFound, ObjectStore, ObjectStoreError
from tributary.protocol.training.bundle import write_training_bundle

router = APIRouter(prefix="/api/training-studies", tags=["training"],
                   dependencies=[Depends(current_user)])

SAFETENSORS = "application/vnd.safetensors"  # no registered type; the format's own name


def study_or_404(session: Session, study_id: str) -> TrainingStudy:
    study = session.get(TrainingStudy, study_id)
    if study is None:
        raise HTTPException(404, f"no training study {study_id!r}")
    return study


def model_store(request: Request) -> ObjectStore:
    """The hub's object store client (one per app, made on first use)."""
    store = getattr(request.app.state, "object_store", None)
    if store is not None:
        return store  # type: ignore[no-any-return]
    path = request.app.state.settings.objectstore_credentials
    if path is None:
        raise HTTPException(503, "this hub has no object store configured "
                                 "(TRIBUTARY_HUB_OBJECTSTORE_CREDENTIALS)")
    try:
        store = ObjectStore.from_file(path)
    except (OSError, ValueError, ObjectStoreError) as exc:
        raise HTTPException(503, f"the hub's object store credentials: {exc}") from None
    request.app.state.object_store = store
    return store


@router.get("/{study_id}/provenance")
def get_provenance(study_id: str, request: Request,
                   session: Session = Depends(get_session)) -> dict[str, Any]:
    """``{"provenance": ..., "envelope": ...}``: the study's provenance (``training-provenance``
    schema) and the same document as the hub's DSSE envelope, to check with its key."""
    study = study_or_404(session, study_id)
    prov = training_export.provenance(session, study, request.app.state.signing_key)
    return {"provenance": prov.model_dump(mode="json"),
            "envelope": training_export.signed(prov, request.app.state.signing_key)}


@router.get("/{study_id}/model", response_class=Response,
            responses={200: {"content": {SAFETENSORS: {}}}})
def get_model(study_id: str, request: Request,
              index: int | None = Query(None, ge=0, description=(
                  "Which global model: 0 the initial one, k the one after the k-th "
                  "aggregated round; default the latest (final) one.")),
              session: Session = Depends(get_session),
              actor: str = Depends(acting(Role.COORDINATOR))) -> Response:
    """A global model (safetensors) from the object store, only if its bytes still match
    the digest the rounds recorded (else 502: the stored object was altered). Its digest
    and the hub's signature over it are in the ``X-Model-Digest`` and ``X-Model-Signature``
    headers (and in the provenance)."""
    study = study_or_404(session, study_id)
    prov = training_export.provenance(session, study, request.app.state.signing_key)
    try:
        record = training_export.pick(prov, index)
    except training_export.ModelUnavailable as exc:
        raise HTTPException(404, str(exc)) from None
    store = model_store(request)
    try:
        data = training_export.read_model(store, record)
    except training_export.ModelTampered as exc:
        audit.record(session, actor, "training.model_refused", study_id, index=record.index,
                     digest=record.digest, reason=str(exc))
        session.commit()
        raise HTTPException(502, str(exc)) from None
    except ObjectNotFound as exc:
        raise HTTPException(502, f"global model {record.index} is missing from the object "
                                 f"store: {exc}") from None
    except ObjectStoreError as exc:
        raise HTTPException(503, str(exc)) from None
    audit.record(session, actor, "training.model_exported", study_id, index=record.index,
                 digest=record.digest)
    session.commit()
    return Response(data, media_type=SAFETENSORS, headers={
        "X-Model-Digest": record.digest, "X-Model-Index": str(record.index),
        "X-Model-Signature": record.signature.replace("\n", ""),
        "Content-Disposition": f'attachment; filename="{study_id}-model-{record.index}'
                               '.safetensors"'})


@router.get("/{study_id}/bundle", response_class=FileResponse)
def get_bundle(study_id: str, request: Request, background: BackgroundTasks,
               session: Session = Depends(get_session),
               actor: str = Depends(acting(Role.COORDINATOR))) -> FileResponse:
    """The training study's bundle (zip): provenance, epsilon ledger per spoke, model
    digests with the hub's signatures, and the hub-signed manifest."""
    study = study_or_404(session, study_id)
    key = request.app.state.signing_key
    prov = training_export.provenance(session, study, key)
    workdir = Path(tempfile.mkdtemp(prefix="tributary-training-bundle-"))
    try:
        folder = write_training_bundle(workdir / study_id, prov, key)
        archive = zip_bundle(folder, workdir / f"{study_id}.zip")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    audit.record(session, actor, "training.bundle_exported", study_id,
                 rounds=len(prov.rounds), models=len(prov.models))
    session.commit()
    background.add_task(shutil.rmtree, workdir, True)
    return FileResponse(archive, media_type="application/zip",
                        filename=f"tributary-{study_id}.zip")
