"""The dashboard's page of private set intersections: each PSI, each spoke's state and the
suppressed result, as GET /api/psi returns them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from sqlmodel import Session

from tributary.hub.deps import get_session
from tributary.hub.models import Role, User
from tributary.hub.services import psi
from tributary.hub.web.rendering import can, page_user, render

router = APIRouter()


@router.get("/psi", response_class=HTMLResponse)
def psi_page(request: Request, session: Session = Depends(get_session),
             user: User = Depends(page_user)) -> HTMLResponse:
    """PSI requests (coordinators), newest first, refreshed while any is under way."""
    if not can(user, Role.COORDINATOR):
        return render(request, "error.html", user, status_code=403,
                       message="Private set intersections are open to coordinators and "
                               "administrators.")
    runs = psi.reads(session, limit=100)
    return render(request, "psi.html", user, runs=runs,
                   refresh=3 if any(r.state in ("requested", "running") for r in runs) else 0)
