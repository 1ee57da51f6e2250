"""The audit trail, newest first."""

from fastapi import APIRouter, Depends, Query
from sqlmodel import Session, select

from tributary.hub.deps import get_session, require
from tributary.hub.models import AuditEvent, QuarantinedMessage, Role
from tributary.hub.services import audit
from tributary.hub.services.anchors import anchors
from tributary.protocol.auditlog import AuditAnchors

router = APIRouter(prefix="/api/audit", tags=["audit"],
                   dependencies=[Depends(require(Role.COORDINATOR))])


@router.get("", response_model=list[AuditEvent])
def list_audit(action: str | None = None, target: str | None = None,
               actor: str | None = None,
               q: str | None = Query(None, description="Text anywhere in actor, action, "
                                                      "target or detail (case-insensitive)."),
               limit: int = Query(200, ge=1, le=5000),
               session: Session = Depends(get_session)) -> list[AuditEvent]:
    return audit.search(session, action, target, actor, q, limit)


@router.get("/anchors", response_model=AuditAnchors)
def audit_anchors(session: Session = Depends(get_session)) -> AuditAnchors:
    """The heads of the hub's forensic log and of every spoke's audit log (from their
    heartbeats): save them, then ``tributary audit verify LOG --anchors FILE`` shows a log
    cut at its end or recreated since."""
    return anchors(session)


quarantine_router = APIRouter(prefix="/api/quarantine", tags=["audit"],
                              dependencies=[Depends(require(Role.COORDINATOR))])


@quarantine_router.get("", response_model=list[QuarantinedMessage])
def list_quarantine(spoke: str | None = None, limit: int = Query(200, ge=1, le=5000),
                    session: Session = Depends(get_session)) -> list[QuarantinedMessage]:
    """Messages the hub refused (bad signature, broken chain, replay…), newest first."""
    query = select(QuarantinedMessage).order_by(QuarantinedMessage.id.desc())  # type: ignore[union-attr]
    if spoke:
        query = query.where(QuarantinedMessage.claimed_spoke == spoke)
    return list(session.exec(query.limit(limit)))
