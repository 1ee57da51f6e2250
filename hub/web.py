"""Server-rendered pages. They refresh themselves while work is in flight."""

from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlmodel import Session, select

from tributary.hub.api.deps import get_session
from tributary.hub.models import Experiment, ExperimentState
from tributary.hub.services.aggregation import aggregate
from tributary.hub.services.progress import case_reads, experiment_read

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def experiments_page(request: Request, session: Session = Depends(get_session)) -> HTMLResponse:
    rows = session.exec(select(Experiment).order_by(Experiment.created_at.desc())).all()  # type: ignore[attr-defined]
    experiments = [experiment_read(session, e) for e in rows]
    active = any(e.state == ExperimentState.LAUNCHED for e in rows)
    return templates.TemplateResponse(request, "experiments.html",
                                      {"experiments": experiments, "refresh": 3 if active else 0})


@router.get("/experiments/{experiment_id}", response_class=HTMLResponse)
def experiment_page(experiment_id: str, request: Request,
                    session: Session = Depends(get_session)) -> HTMLResponse:
    experiment = session.get(Experiment, experiment_id)
    if experiment is None:
        raise HTTPException(404, "no such experiment")
    return templates.TemplateResponse(request, "experiment.html", {
        "e": experiment_read(session, experiment),
        "report": aggregate(session, experiment),
        "cases": case_reads(session, experiment_id),
        "refresh": 3 if experiment.state == ExperimentState.LAUNCHED else 0,
    })
