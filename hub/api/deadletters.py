"""Dead letters: messages that ended in a dead-letter queue, shown as failures with their
reason. Settling them (replay, discard) is an operator's job on the hub machine, with
``tributary dlq``, because it acts on the broker directly."""

from fastapi import APIRouter, Depends, HTTPException
from sqlmodel import Session

from tributary.hub.api.deps import get_session, get_settings, require
from tributary.hub.models import Role
from tributary.hub.services.deadletters import DeadLetterRead, list_dead_letters
from tributary.hub.settings import HubSettings
from tributary.protocol.deadletters import DeadLetterError

router = APIRouter(prefix="/api/dead-letters", tags=["audit"],
                   dependencies=[Depends(require(Role.COORDINATOR))])


@router.get("", response_model=list[DeadLetterRead])
def dead_letters(session: Session = Depends(get_session),
                 settings: HubSettings = Depends(get_settings)) -> list[DeadLetterRead]:
    """Every message in the dead-letter queues of the results queue and of each registered
    spoke's queue, oldest first, with why it is there."""
    try:
        return list_dead_letters(session, settings.broker())
    except DeadLetterError as exc:
        raise HTTPException(503, f"cannot read the dead-letter queues: {exc}") from None
