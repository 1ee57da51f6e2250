"""Private set intersection: which patients spokes share, by an identifier they agree on,
without showing anyone else (docs/cohorts.md#private-set-intersection)."""

from datetime import timedelta

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlmodel import Session

from tributary.hub.deps import acting, current_user, get_broker, get_or_404, get_session
from tributary.hub.models import PsiRun, Role
from tributary.hub.schemas import PsiCreate, PsiRead
from tributary.hub.services import psi
from tributary.protocol.broker import PublishError, StompClient

router = APIRouter(prefix="/api/psi", tags=["psi"], dependencies=[Depends(current_user)])


@router.post("", status_code=201, response_model=PsiRead)
def create_psi(body: PsiCreate, request: Request, session: Session = Depends(get_session),
               broker: StompClient = Depends(get_broker),
               actor: str = Depends(acting(Role.COORDINATOR))) -> PsiRead:
    """Ask the spokes (the first one leads) to intersect their patients. Each spoke's data
    steward approves or refuses; poll ``GET /api/psi/{id}`` for the states and the
    (suppressed) result."""
    try:
        run = psi.create(session, body.mode, body.spoke_ids, body.purpose, actor,
                         timedelta(hours=body.expires_in_hours))
    except psi.PsiInvalid as exc:
        raise HTTPException(422, str(exc)) from None
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
