"""Dead letters: messages that ended in a dead-letter queue, shown as failures with their
reason, and settled (replayed after fixing the cause, or discarded with a reason) by an
administrator here, on the dashboard or with ``tributary dlq``; each settlement audited."""

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlmodel import Session

from tributary.hub.deps import acting, get_session, get_settings, require
from tributary.hub.models import Role
from tributary.hub.services import deadletters
from tributary.hub.services.deadletters import DeadLetterNotFound, DeadLetterRead
from tributary.hub.settings import HubSettings
from tributary.protocol.deadletters import DeadLetterError

router = APIRouter(prefix="/api/dead-letters", tags=["audit"],
                   dependencies=[Depends(require(Role.COORDINATOR))])


class DiscardBody(BaseModel):
    reason: str = Field(min_length=1, max_length=500, description="Why (audited).")


@router.get("", response_model=list[DeadLetterRead])
def dead_letters(session: Session = Depends(get_session),
                 settings: HubSettings = Depends(get_settings)) -> list[DeadLetterRead]:
    """Every message in the dead-letter queues of the results queue and of each registered
    spoke's queue, oldest first, with why it is there."""
    try:
        return deadletters.list_dead_letters(session, settings.broker())
    except DeadLetterError as exc:
        raise HTTPException(503, f"cannot read the dead-letter queues: {exc}") from None


@router.post("/{message_id}/replay", response_model=DeadLetterRead)
def replay(message_id: str, session: Session = Depends(get_session),
           settings: HubSettings = Depends(get_settings),
           actor: str = Depends(acting(Role.ADMIN))) -> DeadLetterRead:
    """Send a dead letter back to the queue it came from (after fixing its cause); returns
    the letter as it was listed."""
    broker = settings.broker()
    with _settling():
        letter = deadletters.find(session, broker, message_id)
        deadletters.replay(session, broker, letter.queue, message_id, actor)
    return letter


@router.post("/{message_id}/discard", response_model=DeadLetterRead)
def discard(message_id: str, body: DiscardBody, session: Session = Depends(get_session),
            settings: HubSettings = Depends(get_settings),
            actor: str = Depends(acting(Role.ADMIN))) -> DeadLetterRead:
    """Delete a dead letter for good; the audit trail keeps its hash and a preview."""
    broker = settings.broker()
    with _settling():
        letter = deadletters.find(session, broker, message_id)
        deadletters.discard(session, broker, letter.queue, message_id, actor, body.reason)
    return letter


@contextmanager
def _settling() -> Iterator[None]:
    try:
        yield
    except DeadLetterNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except DeadLetterError as exc:
        raise HTTPException(503, f"the broker did not settle it: {exc}") from None
