"""A training study's rounds live, as server-sent events, on the same machinery as the
experiments' streams (:mod:`tributary.hub.api.events`: one database poll per study for all
its viewers). The first ``progress`` event holds the study and every round attempt; the
next ones (``"delta": true``) the study and only the attempts that changed; ``end`` once
the study is no longer running."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.engine import Engine
from sqlmodel import Session

from tributary.hub.api.events import _feed, _response, _stream, release
from tributary.hub.deps import current_user, get_session
from tributary.hub.models import TrainingStudy
from tributary.hub.services import training_view

router = APIRouter(prefix="/api/training-studies", tags=["training"],
                   dependencies=[Depends(current_user)])


def _state(engine: Engine, study_id: str) -> dict[str, Any] | None:
    with Session(engine) as session:
        return training_view.study_state(session, study_id)


@router.get("/{study_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def training_events(study_id: str, request: Request,
                    session: Session = Depends(get_session)) -> StreamingResponse:
    """SSE stream of one training study: ``progress`` ``{"study": ..., "rounds": [...]}``
    first, then ``{"study": ..., "rounds": [changed attempts], "delta": true}``, then
    ``end`` once the study has finished, stopped or failed."""
    if session.get(TrainingStudy, study_id) is None:
        raise HTTPException(404, f"no training study {study_id!r}")
    release(session)
    engine = request.app.state.engine
    feed = _feed(request, f"training:{study_id}", lambda: _state(engine, study_id))

    async def first(state: Any) -> Any:
        return state

    return _response(_stream(request, feed, first, training_view.delta,
                             training_view.is_over))
