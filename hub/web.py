"""Server-rendered pages. They refresh themselves while work is in flight."""

from pathlib import Path

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.templating import Jinja2Templates
from sqlmodel import Session, select

from tributary.hub.api.deps import TOKEN_COOKIE, bearer_scheme, current_user, get_session
from tributary.hub.models import CountQuery, Experiment, ExperimentState, Role
from tributary.hub.services.aggregation import latest
from tributary.hub.services.counts import count_read
from tributary.hub.services.progress import case_reads, experiment_read
from tributary.hub.services.users import issue_token

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
router = APIRouter(include_in_schema=False)


class SignInRequired(Exception):
    """Raised by page dependencies; the app turns it into a redirect to /login."""


def page_user(request: Request, session: Session = Depends(get_session),
              credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)) -> str:
    try:
        return current_user(request, credentials, session).username
    except HTTPException:
        raise SignInRequired from None


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, error: str = "") -> HTMLResponse:
    return templates.TemplateResponse(request, "login.html", {"error": error, "refresh": 0})


@router.post("/login")
def login(username: str = Form(...), password: str = Form(...),
          session: Session = Depends(get_session)) -> RedirectResponse:
    issued = issue_token(session, username, password)
    if issued is None:
        return RedirectResponse("/login?error=Wrong+username+or+password", status_code=303)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(TOKEN_COOKIE, issued[0], httponly=True, samesite="strict",
                        expires=issued[1])
    return response


@router.get("/", response_class=HTMLResponse)
def experiments_page(request: Request, session: Session = Depends(get_session),
                     _user: str = Depends(page_user)) -> HTMLResponse:
    rows = session.exec(select(Experiment).order_by(Experiment.created_at.desc())).all()  # type: ignore[attr-defined]
    experiments = [experiment_read(session, e) for e in rows]
    active = any(e.state == ExperimentState.LAUNCHED for e in rows)
    return templates.TemplateResponse(request, "experiments.html",
                                      {"experiments": experiments, "refresh": 3 if active else 0})


@router.get("/experiments/{experiment_id}", response_class=HTMLResponse)
def experiment_page(experiment_id: str, request: Request,
                    session: Session = Depends(get_session),
                    _user: str = Depends(page_user)) -> HTMLResponse:
    experiment = session.get(Experiment, experiment_id)
    if experiment is None:
        raise HTTPException(404, "no such experiment")
    return templates.TemplateResponse(request, "experiment.html", {
        "e": experiment_read(session, experiment),
        "report": latest(session, experiment, request.app.state.settings.min_cell_size),
        "cases": case_reads(session, experiment_id),
        "refresh": 3 if experiment.state == ExperimentState.LAUNCHED else 0,
    })


@router.get("/counts", response_class=HTMLResponse)
def counts_page(request: Request, session: Session = Depends(get_session),
                credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
                ) -> HTMLResponse:
    """Federated counts (coordinators): per-spoke answers and totals."""
    try:
        user = current_user(request, credentials, session)
    except HTTPException:
        raise SignInRequired from None
    if not {Role.ADMIN, Role.COORDINATOR} & set(user.roles):
        raise HTTPException(403, "counts are for coordinators")
    rows = session.exec(select(CountQuery).order_by(CountQuery.created_at.desc())  # type: ignore[attr-defined]
                        .limit(100)).all()
    counts = [count_read(session, q) for q in rows]
    return templates.TemplateResponse(request, "counts.html", {
        "counts": counts, "refresh": 3 if any(not c.complete for c in counts) else 0})
