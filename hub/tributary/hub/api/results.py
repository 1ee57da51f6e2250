"""Results and aggregates of an experiment, as JSON for the pages and as exports (CSV or
JSON). Aggregates come from the latest stored snapshot, already small-cell suppressed."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import func
from sqlmodel import Session, select

from tributary.hub.aggregation.report import AggregateRead, ResultRow, SnapshotInfo
from tributary.hub.deps import (
    acting,
    case_reader,
    current_user,
    get_or_404,
    get_session,
    get_settings,
)
from tributary.hub.models import CaseResult, Experiment, Role, User
from tributary.hub.services import aggregation, audit, exports
from tributary.hub.settings import HubSettings

router = APIRouter(prefix="/api/experiments", tags=["results"],
                   dependencies=[Depends(current_user)])

Format = Literal["json", "csv"]
CSV = {200: {"content": {"text/csv": {}}, "description": "CSV, one header row."}}
VERSION = Query(None, ge=1, description="A stored snapshot version; default the latest.")


def _experiment(session: Session, experiment_id: str) -> Experiment:
    return get_or_404(session, Experiment, experiment_id, "experiment")


def _csv(body: str, filename: str) -> Response:
    return Response(body, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _exported(session: Session, actor: str, experiment_id: str, fmt: str,
              report: AggregateRead) -> None:
    """Every export of an aggregate is audited with its format and snapshot version."""
    audit.record(session, actor, "aggregate.exported", experiment_id, format=fmt,
                 version=report.version)
    session.commit()


def _aggregate(session: Session, settings: HubSettings, experiment_id: str,
               version: int | None) -> AggregateRead:
    experiment = _experiment(session, experiment_id)
    try:
        return aggregation.latest(session, experiment, settings.min_cell_size, version)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None


@router.get("/{experiment_id}/aggregate", response_model=AggregateRead,
            responses={200: {"content": {"text/csv": {}}}})
def get_aggregate(experiment_id: str, format: Format = "json", version: int | None = VERSION,
                  session: Session = Depends(get_session),
                  settings: HubSettings = Depends(get_settings),
                  user: User = Depends(current_user)) -> AggregateRead | Response:
    """Figures per spoke and pooled, with intervals and ROC points, from the latest snapshot
    (computed when results arrive, not on read). ``format=csv`` gives the CSV export."""
    report = _aggregate(session, settings, experiment_id, version)
    if format == "csv":
        _exported(session, user.username, experiment_id, "csv", report)
        return _csv(exports.aggregate_csv(report), f"{experiment_id}-aggregate.csv")
    return report


@router.get("/{experiment_id}/aggregate/versions", response_model=list[SnapshotInfo])
def aggregate_versions(experiment_id: str,
                       session: Session = Depends(get_session)) -> list[SnapshotInfo]:
    """Every stored snapshot of the aggregate, oldest first."""
    _experiment(session, experiment_id)
    return aggregation.history(session, experiment_id)


@router.get("/{experiment_id}/aggregate.json", response_model=AggregateRead)
def export_aggregate_json(experiment_id: str, version: int | None = VERSION,
                          session: Session = Depends(get_session),
                          settings: HubSettings = Depends(get_settings),
                          actor: str = Depends(acting(Role.COORDINATOR))) -> AggregateRead:
    report = _aggregate(session, settings, experiment_id, version)
    _exported(session, actor, experiment_id, "json", report)
    return report


@router.get("/{experiment_id}/aggregate.csv", response_class=Response, responses=CSV)
def export_aggregate_csv(experiment_id: str, version: int | None = VERSION,
                         session: Session = Depends(get_session),
                         settings: HubSettings = Depends(get_settings),
                         actor: str = Depends(acting(Role.COORDINATOR))) -> Response:
    """One row per group and figure: value, n, interval, method, suppression."""
    report = _aggregate(session, settings, experiment_id, version)
    _exported(session, actor, experiment_id, "csv", report)
    return _csv(exports.aggregate_csv(report), f"{experiment_id}-aggregate.csv")


@router.get("/{experiment_id}/roc.csv", response_class=Response, responses=CSV)
def export_roc_csv(experiment_id: str, version: int | None = VERSION,
                   session: Session = Depends(get_session),
                   settings: HubSettings = Depends(get_settings),
                   actor: str = Depends(acting(Role.COORDINATOR))) -> Response:
    """ROC points per group (aggregators that rank a score); suppressed groups say so."""
    report = _aggregate(session, settings, experiment_id, version)
    _exported(session, actor, experiment_id, "roc.csv", report)
    return _csv(exports.roc_csv(report), f"{experiment_id}-roc.csv")


def _results(request: Request, session: Session, experiment_id: str, actor: str,
             fmt: str) -> StreamingResponse:
    """Every case's result, streamed from the database in chunks (constant memory
    whatever the study's size); the export is audited before the first byte."""
    _experiment(session, experiment_id)
    count = session.exec(select(func.count()).select_from(CaseResult).where(
        CaseResult.experiment_id == experiment_id)).one()
    audit.record(session, actor, "results.exported", experiment_id, format=fmt, cases=count)
    session.commit()
    engine = request.app.state.engine
    if fmt == "csv":
        return StreamingResponse(
            exports.stream_results_csv(engine, experiment_id),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition":
                     f'attachment; filename="{experiment_id}-results.csv"'})
    return StreamingResponse(exports.stream_results_json(engine, experiment_id),
                             media_type="application/json")


@router.get("/{experiment_id}/results", response_model=list[ResultRow],
            responses={200: {"content": {"text/csv": {}}}})
def get_results(experiment_id: str, request: Request, format: Format = "json",
                session: Session = Depends(get_session),
                actor: str = Depends(case_reader)) -> StreamingResponse:
    """Every case: spoke, pseudonym, state, attempt, flattened outputs and released
    attributes (what the spokes released; no small-cell rule applies to single cases)."""
    return _results(request, session, experiment_id, actor, format)


@router.get("/{experiment_id}/results.json", response_model=list[ResultRow])
def export_results_json(experiment_id: str, request: Request,
                        session: Session = Depends(get_session),
                        actor: str = Depends(case_reader)) -> StreamingResponse:
    return _results(request, session, experiment_id, actor, "json")


@router.get("/{experiment_id}/results.csv", response_class=Response, responses=CSV)
def export_results_csv(experiment_id: str, request: Request,
                       session: Session = Depends(get_session),
                       actor: str = Depends(case_reader)) -> StreamingResponse:
    return _results(request, session, experiment_id, actor, "csv")
