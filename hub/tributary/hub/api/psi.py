"""Private set intersection: which patients spokes share, by an identifier they agree on,
without showing anyone else (docs/cohorts.md#private-set-intersection)."""

import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Request
from fastapi.responses import FileResponse
from sqlmodel import Session

from tributary.hub.deps import (
    acting,
    current_user,
    get_broker,
    get_or_404,
    get_session,
    get_settings,
)
from tributary.hub.models import PsiRun, Role
from tributary.hub.schemas import PsiCreate, PsiRead
from tributary.hub.services import audit, credentials, psi
from tributary.hub.services.access_grants import AccessRefused
from tributary.hub.services.anchors import anchors
from tributary.hub.settings import HubSettings
from tributary.protocol.broker import PublishError, StompClient
from tributary.protocol.bundle import write_bundle, zip_bundle

router = APIRouter(prefix="/api/psi", tags=["psi"], dependencies=[Depends(current_user)])


@router.post("", status_code=201, response_model=PsiRead)
def create_psi(body: PsiCreate, request: Request, session: Session = Depends(get_session),
               broker: StompClient = Depends(get_broker),
               settings: HubSettings = Depends(get_settings),
               actor: str = Depends(acting(Role.COORDINATOR))) -> PsiRead:
    """Ask the spokes (the first one leads) to intersect their patients. Each spoke's data
    steward approves or refuses; poll ``GET /api/psi/{id}`` for the states and the
    (suppressed) result. A spoke that is not a federation member now (its membership
    credential, where the hub asks for one) is refused (409, audited): nothing is sent."""
    listed = credentials.refuse_non_members(session, settings, body.spoke_ids, actor,
                                            "psi.launch_refused", body.purpose[:80])
    if listed:
        raise HTTPException(409, {"message": "spokes whose membership credential is refused",
                                  "refusals": listed})
    try:
        run = psi.create(session, body.mode, body.spoke_ids, body.purpose, actor,
                         timedelta(hours=body.expires_in_hours), body.access_request_id,
                         settings.require_access_requests)
    except psi.PsiInvalid as exc:
        raise HTTPException(422, str(exc)) from None
    except AccessRefused as exc:
        raise HTTPException(409, exc.detail()) from None
    try:
        psi.publish(session, broker, request.app.state.signing_key, run)
    except PublishError as exc:
        raise HTTPException(503, f"broker unavailable, PSI {run.id} not sent to every spoke "
                                 f"(POST /api/psi/{run.id}/send to finish): {exc}") from None
    return psi.read(session, run)


@router.post("/{psi_id}/send", response_model=PsiRead)
def resend_psi(psi_id: str, request: Request, session: Session = Depends(get_session),
               broker: StompClient = Depends(get_broker),
               _actor: str = Depends(acting(Role.COORDINATOR))) -> PsiRead:
    """Finish sending a PSI request interrupted by a broker outage."""
    run = get_or_404(session, PsiRun, psi_id, "PSI")
    try:
        psi.publish(session, broker, request.app.state.signing_key, run)
    except PublishError as exc:
        raise HTTPException(503, f"broker unavailable: {exc}") from None
    return psi.read(session, run)


@router.get("", response_model=list[PsiRead])
def list_psi(session: Session = Depends(get_session),
             _actor: str = Depends(acting(Role.COORDINATOR))) -> list[PsiRead]:
    return psi.reads(session)


@router.get("/{psi_id}", response_model=PsiRead)
def get_psi(psi_id: str, session: Session = Depends(get_session),
            _actor: str = Depends(acting(Role.COORDINATOR))) -> PsiRead:
    return psi.read(session, get_or_404(session, PsiRun, psi_id, "PSI"))


@router.get("/{psi_id}/bundle", response_class=FileResponse)
def psi_bundle(psi_id: str, request: Request, background: BackgroundTasks,
               session: Session = Depends(get_session),
               actor: str = Depends(acting(Role.COORDINATOR))) -> FileResponse:
    """The PSI's bundle (zip, hub-signed manifest): the request, each spoke's state, the
    suppressed result and the PSI's audit trail, with the audit log anchors of its spokes."""
    run = get_or_404(session, PsiRun, psi_id, "PSI")
    entries = psi.bundle_entries(session, run)
    described = {"id": run.id, "name": f"Private set intersection ({run.mode}): "
                                      f"{run.purpose}", **entries}
    held = anchors(session, [s.spoke_id for s in psi.members(session, run.id)])
    workdir = Path(tempfile.mkdtemp(prefix="tributary-psi-bundle-"))
    try:
        folder = write_bundle(workdir / run.id, described, [], request.app.state.signing_key,
                              held)
        archive = zip_bundle(folder, workdir / f"{run.id}.zip")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    audit.record(session, actor, "bundle.exported", run.id, events=len(entries["audit"]))
    session.commit()
    background.add_task(shutil.rmtree, workdir, True)
    return FileResponse(archive, media_type="application/zip",
                        filename=f"tributary-{run.id}.zip")
