"""The hub's view of dead letters: what ended in the dead-letter queue of the results
queue and of each spoke's queue, each with the best reason the hub knows, and the audited
replay and discard an operator uses to settle them (``tributary dlq``, the API, the
dashboard)."""

from __future__ import annotations

import base64
import json
from typing import Any

from pydantic import BaseModel
from sqlmodel import Session, select

from tributary.hub.models import QuarantinedMessage, Spoke
from tributary.hub.services import audit
from tributary.protocol import deadletters
from tributary.protocol.broker import BrokerSettings
from tributary.protocol.deadletters import DeadLetter
from tributary.protocol.destinations import dead_letter_queue, results_queue, spoke_queue
from tributary.protocol.signing import sha256_hex

#: How much of a body the list shows; the broker keeps all of it.
BODY_PREVIEW = 4096


class DeadLetterRead(BaseModel):
    queue: str
    broker_message_id: str
    original_destination: str
    timestamp: Any
    expired: bool
    size: int
    kind: str | None
    spoke_id: str | None
    experiment_id: str | None
    reason: str
    body_preview: str


def dead_letter_queues(session: Session, federation: str) -> list[str]:
    """The results queue's DLQ and every registered spoke's."""
    spokes = session.exec(select(Spoke.id).order_by(Spoke.id)).all()
    return [dead_letter_queue(results_queue(federation)),
            *(dead_letter_queue(spoke_queue(s, federation)) for s in spokes)]


def _summary(body: str) -> dict[str, Any]:
    """Kind, experiment and spoke from a signed envelope, unverified: labels for people,
    never trusted for anything else."""
    try:
        envelope = json.loads(body)
        payload = json.loads(base64.b64decode(envelope["payload"]))
        return payload if isinstance(payload, dict) else {}
    except Exception:
        return {}


def reason(session: Session, letter: DeadLetter, federation: str) -> str:
    quarantined = session.exec(select(QuarantinedMessage).where(
        QuarantinedMessage.broker_message_id == letter.broker_message_id)).first()
    if quarantined is not None:
        return f"refused by the hub: {quarantined.reason}"
    if letter.expired:
        return ("expired in the broker before anyone consumed it (the receiver was away "
                "longer than the message's expiry)")
    cause = letter.headers.get("dlqDeliveryFailureCause")
    broker_says = f" (broker: {cause})" if cause else ""
    if letter.original_destination == results_queue(federation):
        return f"rejected by a consumer of the results queue, no hub record of why{broker_says}"
    spoke = letter.original_destination.rsplit(".", 1)[-1]
    return (f"refused by spoke {spoke}: its audit log (action message.dead_lettered) "
            f"records why{broker_says}")


def describe(session: Session, letter: DeadLetter, federation: str) -> DeadLetterRead:
    summary = _summary(letter.body)
    return DeadLetterRead(
        queue=letter.queue, broker_message_id=letter.broker_message_id,
        original_destination=letter.original_destination, timestamp=letter.timestamp,
        expired=letter.expired, size=letter.size,
        kind=letter.kind or summary.get("kind"), spoke_id=summary.get("spoke_id"),
        experiment_id=summary.get("experiment_id"),
        reason=reason(session, letter, federation), body_preview=letter.body[:BODY_PREVIEW])


def list_dead_letters(session: Session, broker: BrokerSettings,
                      queues: list[str] | None = None) -> list[DeadLetterRead]:
    found = []
    for dlq in queues or dead_letter_queues(session, broker.federation):
        found.extend(describe(session, letter, broker.federation)
                     for letter in deadletters.browse(broker, dlq))
    return found


class DeadLetterNotFound(deadletters.DeadLetterError):
    pass


def find(session: Session, broker: BrokerSettings, message_id: str) -> DeadLetterRead:
    """The dead letter with this broker message id, in whichever dead-letter queue."""
    for letter in list_dead_letters(session, broker):
        if letter.broker_message_id == message_id:
            return letter
    raise DeadLetterNotFound(f"no dead letter {message_id} in any dead-letter queue")


def _check(dlq: str) -> None:
    if not deadletters.is_dead_letter_queue(dlq):
        raise deadletters.DeadLetterError(f"{dlq} is not a dead-letter queue")


def replay(session: Session, broker: BrokerSettings, dlq: str, message_id: str,
           actor: str) -> DeadLetter:
    """Re-send a dead letter to the queue it came from; audited with its content hash."""
    _check(dlq)
    letter = deadletters.replay(broker, dlq, message_id)
    _record(session, actor, "dead_letter.replayed", letter)
    return letter


def discard(session: Session, broker: BrokerSettings, dlq: str, message_id: str,
            actor: str, why: str) -> DeadLetter:
    """Delete a dead letter; the audit record keeps its hash and a preview of it."""
    _check(dlq)
    letter = deadletters.discard(broker, dlq, message_id)
    _record(session, actor, "dead_letter.discarded", letter, reason=why,
            body_preview=letter.body[:512])
    return letter


def _record(session: Session, actor: str, action: str, letter: DeadLetter,
            **extra: Any) -> None:
    audit.record(session, actor, action, letter.queue,
                 broker_message_id=letter.broker_message_id,
                 original_destination=letter.original_destination, kind=letter.kind,
                 size=letter.size, sha256=sha256_hex(letter.body.encode()), **extra)
    session.commit()
