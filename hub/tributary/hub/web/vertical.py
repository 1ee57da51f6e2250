"""The dashboard's vertical training page: every vertical study with its parties, state
and loss curve (drawn on the hub as SVG, like the other studies' curves)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from sqlmodel import Session, col, select

from tributary.hub.deps import get_session
from tributary.hub.models import User, VerticalStudy
from tributary.hub.services import plots, vertical
from tributary.hub.web.rendering import STATE_CLASS, page_user, render

router = APIRouter(include_in_schema=False)

STATE_CLASS.update({"inviting": "wait", "completed": "ok", "refused": "failed"})


def loss_svg(study: VerticalStudy) -> str:
    key = ("vertical-loss", study.id, plots.fingerprint(study.losses))
    return plots.CACHE.get(key, lambda: plots.loss_curve(
        study.losses, f"Training loss per round of {study.name}"))


@router.get("/vertical", response_class=HTMLResponse)
def vertical_studies_page(request: Request, session: Session = Depends(get_session),
                          user: User = Depends(page_user)) -> HTMLResponse:
    studies = session.exec(select(VerticalStudy).order_by(
        col(VerticalStudy.created_at).desc())).all()
    return render(request, "vertical_studies.html", user, studies=[
        {"s": s, "rounds": vertical.hyper(s).rounds, "curve": loss_svg(s),
         "model": vertical.model(s)} for s in studies])
