"""Vertical training studies: create (coordinators), list and read (any signed-in user),
their per-round loss and the final model as the coordinator may see it. The hub's vertical
coordinator (:mod:`tributary.hub.vertical_coordinator`) picks a new study up on its next
pass and invites both spokes."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Request
from fastapi.responses import FileResponse
from sqlmodel import Session, col, select

from tributary.hub.deps import acting, current_user, get_or_404, get_session, get_settings
from tributary.hub.models import Role, VerticalStudy
from tributary.hub.schemas import (
    VerticalModelRead,
    VerticalPartyRead,
    VerticalStudyCreate,
    VerticalStudyRead,
)
from tributary.hub.services import (
    audit,
    credentials,
    training_reads,
    vertical,
    vertical_export,
)
from tributary.hub.services.access_grants import AccessRefused
from tributary.hub.settings import HubSettings
from tributary.protocol.bundle import zip_bundle
from tributary.protocol.cohorts.vertical import Hyperparameters

router = APIRouter(prefix="/api/vertical-studies", tags=["vertical"],
                   dependencies=[Depends(current_user)])


def read(study: VerticalStudy) -> VerticalStudyRead:
    parties = {s: VerticalPartyRead(**{k: v for k, v in p.items()
                                       if k in VerticalPartyRead.model_fields})
               for s, p in study.parties.items()}
    return VerticalStudyRead(**study.model_dump(exclude={"parties", "answers", "final",
                                                         "positive"}), parties=parties)


@router.post("", status_code=201, response_model=VerticalStudyRead)
def create_study(body: VerticalStudyCreate, session: Session = Depends(get_session),
                 settings: HubSettings = Depends(get_settings),
                 actor: str = Depends(acting(Role.COORDINATOR))) -> VerticalStudyRead:
    """Create a vertical study: both spokes registered, enrolled and not revoked (422 with
    each refusal), members of the federation now (409, audited, where the hub asks for
    membership credentials), the attributes well-formed; the spokes' own checks
    (allowlist, linking table, steward) come back as the parties' states."""
    spokes = [body.features_spoke, body.label_spoke]
    refusals = training_reads.spoke_refusals(session, spokes)
    if refusals:
        raise HTTPException(422, {"message": "spokes that cannot take part",
                                  "refusals": [{"spoke_id": s, "reason": r}
                                               for s, r in sorted(refusals.items())]})
    listed = credentials.refuse_non_members(session, settings, spokes, actor,
                                            "vertical.launch_refused", body.name)
    if listed:
        raise HTTPException(409, {"message": "spokes whose membership credential is refused",
                                  "refusals": listed})
    try:
        study = vertical.create(
            session, name=body.name, psi_id=body.psi_id, features_spoke=body.features_spoke,
            label_spoke=body.label_spoke, features_attributes=body.features_attributes,
            label_attributes=body.label_attributes, label=body.label, positive=body.positive,
            hyperparameters=Hyperparameters(rounds=body.rounds, learning_rate=body.learning_rate,
                                            l2=body.l2, key_bits=body.key_bits),
            release_coefficients=body.release_coefficients, created_by=actor,
            access_request_id=body.access_request_id,
            access_required=settings.require_access_requests)
    except vertical.VerticalError as exc:
        raise HTTPException(422, str(exc)) from None
    except AccessRefused as exc:
        session.commit()  # the refusal's audit event; nothing else was added
        raise HTTPException(409, exc.detail()) from None
    session.commit()
    session.refresh(study)
    return read(study)


@router.get("", response_model=list[VerticalStudyRead])
def list_studies(session: Session = Depends(get_session)) -> list[VerticalStudyRead]:
    rows = session.exec(select(VerticalStudy).order_by(col(VerticalStudy.created_at).desc()))
    return [read(s) for s in rows]


@router.get("/{study_id}", response_model=VerticalStudyRead)
def get_study(study_id: str, session: Session = Depends(get_session)) -> VerticalStudyRead:
    return read(get_or_404(session, VerticalStudy, study_id, "vertical study"))


@router.get("/{study_id}/losses", response_model=list[float])
def get_losses(study_id: str, session: Session = Depends(get_session)) -> list[float]:
    """The training loss before each round's step (the label spoke's, one number a round)."""
    return get_or_404(session, VerticalStudy, study_id, "vertical study").losses


@router.get("/{study_id}/model", response_model=VerticalModelRead)
def get_model(study_id: str, session: Session = Depends(get_session)) -> VerticalModelRead:
    study = get_or_404(session, VerticalStudy, study_id, "vertical study")
    return VerticalModelRead(state=study.state, **vertical.model(study))


@router.get("/{study_id}/bundle", response_class=FileResponse)
def get_bundle(study_id: str, request: Request, background: BackgroundTasks,
               session: Session = Depends(get_session),
               actor: str = Depends(acting(Role.COORDINATOR))) -> FileResponse:
    """The study's bundle (zip): the study, its audit events, the hub-signed manifest."""
    study = get_or_404(session, VerticalStudy, study_id, "vertical study")
    workdir = Path(tempfile.mkdtemp(prefix="tributary-vertical-bundle-"))
    try:
        folder = vertical_export.write_vertical_bundle(workdir / study_id, session, study,
                                                       request.app.state.signing_key)
        archive = zip_bundle(folder, workdir / f"{study_id}.zip")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    audit.record(session, actor, "vertical.bundle_exported", study_id)
    session.commit()
    background.add_task(shutil.rmtree, workdir, True)
    return FileResponse(archive, media_type="application/zip",
                        filename=f"tributary-{study_id}.zip")
