"""Live progress as server-sent events (SSE): the dashboard's pages and ``tributary study
watch`` follow experiments without polling the REST API themselves.

A stream sends one ``progress`` event at once and another whenever the snapshot changes
(the hub checks its database every ``POLL_SECONDS``), a comment line as keep-alive, and an
``end`` event when the experiment is completed, after which clients close. The same
bearer token or dashboard cookie as the rest of the API authorises it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool

from tributary.hub.deps import current_user, may_see_cases
from tributary.hub.models import (
    TERMINAL_TARGET_STATES,
    Experiment,
    ExperimentState,
    TargetState,
    User,
)
from tributary.hub.services.progress import case_reads, experiment_read

router = APIRouter(prefix="/api/experiments", tags=["experiments"],
                   dependencies=[Depends(current_user)])

POLL_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0
#: States in which an experiment may still change; any other state ends the stream.
LIVE_STATES = {ExperimentState.DRAFT.value, ExperimentState.LAUNCHED.value}
SETTLED_TARGET_STATES = {s.value for s in TERMINAL_TARGET_STATES} | {TargetState.PENDING.value}


def experiment_snapshot(engine: Engine, experiment_id: str, online_seconds: float,
                        with_cases: bool = True) -> dict[str, Any] | None:
    """The experiment with its per-spoke progress and every case (None if unknown); the
    cases only ``with_cases`` (a user who may see per-case data), else an empty list."""
    with Session(engine) as session:
        experiment = session.get(Experiment, experiment_id)
        if experiment is None:
            return None
        read = experiment_read(session, experiment, online_seconds)
        cases = case_reads(session, experiment_id) if with_cases else []
        return {"experiment": read.model_dump(mode="json"),
                "cases": [c.model_dump(mode="json") for c in cases]}


def experiments_snapshot(engine: Engine, online_seconds: float) -> dict[str, Any]:
    """Every experiment with its per-spoke progress (no cases), newest first."""
    with Session(engine) as session:
        rows = session.exec(select(Experiment).order_by(Experiment.created_at.desc())).all()  # type: ignore[attr-defined]
        return {"experiments": [experiment_read(session, e, online_seconds)
                                .model_dump(mode="json") for e in rows]}


def is_over(snapshot: dict[str, Any]) -> bool:
    """Nothing more will change: the experiment is past launched and every spoke has
    settled (a cancelled experiment's spokes still confirm their cancellation)."""
    experiment = snapshot["experiment"]
    return experiment["state"] not in LIVE_STATES and all(
        t["state"] in SETTLED_TARGET_STATES for t in experiment["targets"])


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream(request: Request, snapshot: Any, done: Any) -> AsyncIterator[str]:
    last = None
    quiet = 0.0
    yield "retry: 3000\n\n"
    while not await request.is_disconnected():
        current = await run_in_threadpool(snapshot)
        if current != last:
            last, quiet = current, 0.0
            yield _event("progress", current)
            if done(current):
                yield _event("end", {})
                return
        elif quiet >= KEEPALIVE_SECONDS:
            quiet = 0.0
            yield ": keep-alive\n\n"
        await asyncio.sleep(POLL_SECONDS)
        quiet += POLL_SECONDS


def _response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.get("/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def experiments_events(request: Request) -> StreamingResponse:
    """SSE stream of every experiment's progress (``progress`` events with
    ``{"experiments": [...]}``, as ``GET /api/experiments`` returns them)."""
    engine, window = request.app.state.engine, request.app.state.settings.spoke_online_seconds
    return _response(_stream(request, lambda: experiments_snapshot(engine, window),
                             lambda _: False))


@router.get("/{experiment_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def experiment_events(experiment_id: str, request: Request,
                      user: User = Depends(current_user)) -> StreamingResponse:
    """SSE stream of one experiment: ``progress`` events with ``{"experiment": ...,
    "cases": [...]}`` (as ``GET /api/experiments/{id}`` and ``.../cases``) whenever they
    change, then ``end`` once it is over (completed or
    cancelled, and every spoke settled). ``cases`` is empty for a user who may not see
    per-case data."""
    engine, window = request.app.state.engine, request.app.state.settings.spoke_online_seconds
    with_cases = may_see_cases(user)
    if experiment_snapshot(engine, experiment_id, window) is None:
        raise HTTPException(404, f"no experiment {experiment_id!r}")
    return _response(_stream(
        request, lambda: experiment_snapshot(engine, experiment_id, window, with_cases),
        is_over))
