"""The dashboard's training pages: the list of training studies and one study's page with
its rounds (live over ``/api/training-studies/{id}/events``), its curves drawn on the hub
as SVG, the dropouts of every round, the stop reason and the final model's download with
its provenance."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from sqlmodel import Session

from tributary.hub.deps import get_session
from tributary.hub.models import Role, User
from tributary.hub.services import access_requests, plots, training_view
from tributary.hub.services import algorithms as algorithm_versions
from tributary.hub.services.enrolment import enrolled_spokes
from tributary.hub.services.server_optimisers import ServerOptimiser
from tributary.hub.services.spokes import spoke_reads
from tributary.hub.web.rendering import STATE_CLASS, can, page_user, render, templates

router = APIRouter(include_in_schema=False)

STATE_CLASS.update({"aggregated": "ok", "finished": "ok", "retried": "wait",
                    "stopped_budget": "wait", **{s: "run" for s in training_view.OPEN_STAGES}})


def _state_or_404(session: Session, study_id: str) -> dict[str, Any]:
    state = training_view.study_state(session, study_id)
    if state is None:
        raise HTTPException(404, "no such training study")
    return state


def curves_svg(state: dict[str, Any]) -> str:
    """The study's curves, drawn once per state of its rounds."""
    study, rounds = state["study"], state["rounds"]
    key = ("training-curves", study["id"], plots.fingerprint(
        [(r["round"], r["attempt"], r["outcome"], len(r["joined"]), len(r["survived"]),
          r["epsilon_cumulative"], r["mean_loss"]) for r in rounds]))
    return plots.CACHE.get(key, lambda: plots.training_curves(
        training_view.points(rounds), study["epsilon_budget"]))


def _summary_context(state: dict[str, Any]) -> dict[str, Any]:
    return {"s": state["study"], "rounds": state["rounds"], "curves": curves_svg(state)}


@router.get("/training", response_class=HTMLResponse)
def training_studies_page(request: Request, session: Session = Depends(get_session),
                          user: User = Depends(page_user)) -> HTMLResponse:
    return render(request, "training_studies.html", user,
                   studies=training_view.studies(session))


@router.get("/training/new", response_class=HTMLResponse)
def new_training_page(request: Request, session: Session = Depends(get_session),
                      user: User = Depends(page_user)) -> HTMLResponse:
    """The launch form: it posts ``POST /api/training-studies`` (the page's CSRF token with
    it), so a launch from the dashboard is checked and audited as one from the API or CLI.
    Offered: the approved, unrevoked algorithm versions (a study names one, whose image and
    approval the hub sends with every round), and the spokes that can take part (enrolled,
    not revoked, not sandbox); the others are listed, disabled, with why."""
    approved = [{"id": a.id, "image": f"{a.repository}@{a.digest}",
                 "label": f"{a.name} {a.version}"}
                for a in reversed(algorithm_versions.algorithms(session))
                if algorithm_versions.state(a) == "approved"]
    spokes = spoke_reads(session, request.app.state.settings.spoke_online_seconds)
    return render(request, "training_new.html", user, approved=approved, spokes=spokes,
                   access_requests=access_requests.approved_for(session, user.username),
                   enrolled=enrolled_spokes(session), defaults=ServerOptimiser(),
                   may_launch=can(user, Role.COORDINATOR))


@router.get("/training/{study_id}", response_class=HTMLResponse)
def training_study_page(study_id: str, request: Request,
                        session: Session = Depends(get_session),
                        user: User = Depends(page_user)) -> HTMLResponse:
    state = _state_or_404(session, study_id)
    return render(request, "training_study.html", user, **_summary_context(state))


@router.get("/training/{study_id}/summary", response_class=HTMLResponse)
def training_summary_fragment(study_id: str, request: Request,
                              session: Session = Depends(get_session),
                              user: User = Depends(page_user)) -> HTMLResponse:
    """The curves and the final model's section alone: the page swaps them in when a
    round changes."""
    state = _state_or_404(session, study_id)
    html = templates.get_template("_training_summary.html").render(
        user=user, can={"coordinator": can(user, Role.COORDINATOR)},
        state_class=templates.env.globals["state_class"],
        **_summary_context(state))
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})
