"""Federated counts: ask target spokes how many cases match a selection."""

from datetime import timedelta

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlmodel import Session

from tributary.hub.deps import acting, current_user, get_broker, get_or_404, get_session
from tributary.hub.models import CountQuery, Role, Spoke
from tributary.hub.schemas import CountCreate, CountRead
from tributary.hub.services.counts import count_read, count_reads, create_query, publish_query
from tributary.hub.services.enrolment import active_keys
from tributary.protocol.broker import PublishError, StompClient
from tributary.protocol.count_policy import count_selection_problem

router = APIRouter(prefix="/api/counts", tags=["counts"], dependencies=[Depends(current_user)])


def _get(session: Session, query_id: str) -> CountQuery:
    return get_or_404(session, CountQuery, query_id, "count")


@router.post("", status_code=201, response_model=CountRead)
def create_count(body: CountCreate, request: Request, session: Session = Depends(get_session),
                 broker: StompClient = Depends(get_broker),
                 actor: str = Depends(acting(Role.COORDINATOR))) -> CountRead:
    """Ask each spoke how many of its cases match ``selection``; answers arrive
    asynchronously: poll ``GET /api/counts/{id}``. A count may not select case ids or cap
    its cases (422); each spoke refuses answers that difference out fewer than k cases."""
    problem = count_selection_problem(body.selection)
    if problem is not None:
        raise HTTPException(422, problem)
    unknown = [s for s in body.spoke_ids if session.get(Spoke, s) is None]
    if unknown:
        raise HTTPException(422, f"unknown spokes: {', '.join(unknown)}")
    unenrolled = [s for s in body.spoke_ids if not active_keys(session, s)]
    if unenrolled:
        raise HTTPException(422, f"spokes without an enrolled key cannot be asked: "
                                 f"{', '.join(unenrolled)}")
    query = create_query(session, body.selection, body.spoke_ids, actor,
                         timedelta(hours=body.expires_in_hours))
    try:
        publish_query(session, broker, request.app.state.signing_key, query)
    except PublishError as exc:
        raise HTTPException(503, f"broker unavailable, count {query.id} not sent to every "
                                 f"spoke (POST /api/counts/{query.id}/send to finish): "
                                 f"{exc}") from None
    return count_read(session, query)


@router.post("/{query_id}/send", response_model=CountRead)
def resend_count(query_id: str, request: Request, session: Session = Depends(get_session),
                 broker: StompClient = Depends(get_broker),
                 _actor: str = Depends(acting(Role.COORDINATOR))) -> CountRead:
    """Finish sending a count interrupted by a broker outage."""
    query = _get(session, query_id)
    try:
        publish_query(session, broker, request.app.state.signing_key, query)
    except PublishError as exc:
        raise HTTPException(503, f"broker unavailable: {exc}") from None
    return count_read(session, query)


@router.get("", response_model=list[CountRead])
def list_counts(session: Session = Depends(get_session),
                _actor: str = Depends(acting(Role.COORDINATOR))) -> list[CountRead]:
    return count_reads(session)


@router.get("/{query_id}", response_model=CountRead)
def get_count(query_id: str, session: Session = Depends(get_session),
              _actor: str = Depends(acting(Role.COORDINATOR))) -> CountRead:
    return count_read(session, _get(session, query_id))
