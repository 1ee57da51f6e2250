"""What the hub checks of a spoke's training answers besides SecAgg+ itself: that a masked
update comes bound to the spoke's signed custody record for exactly this round and object,
that the record follows the spoke's previous one (kept: a gap or a fork is refused), and
that a spoke's refusal of a round is recorded with its reason. Kept apart from the
round state machine (:mod:`tributary.hub.services.training`), which stays about rounds."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from tributary.hub.models import TrainingCustody, TrainingRound, TrainingStudy
from tributary.hub.services import audit
from tributary.hub.services.training import TrainingError
from tributary.protocol.signing import PublicKey, SignatureError
from tributary.protocol.training import rounds as msg
from tributary.protocol.training.custody import (
    GENESIS,
    UpdateCustody,
    check_chain,
    record_hash,
    verify_update_custody,
)

ACTOR = "hub:training"


def check_masked_custody(message: msg.Masked, sender: str, spoke_key: PublicKey,
                         study: TrainingStudy, row: TrainingRound) -> UpdateCustody:
    """The custody record of ``message``, if ``sender`` signed one for its very object and
    round; else :class:`TrainingError` (the masked input is then not accepted)."""
    if message.custody is None:
        raise TrainingError(f"{sender}'s masked update carries no custody record")
    try:
        return verify_update_custody(
            message.custody, spoke_key, spoke_id=sender, study_id=study.id,
            round_id=row.round_id, round_index=row.round_index, attempt=row.attempt,
            image_digest=study.algorithm, object_digest=message.upload.digest,
            location=message.upload.location)
    except SignatureError as exc:
        raise TrainingError(f"{sender}'s masked update custody: {exc}") from None


def keep_custody(session: Session, sender: str, spoke_key: PublicKey,
                 envelope: dict[str, Any], record: UpdateCustody, object_digest: str) -> bool:
    """Keep ``sender``'s verified custody record if it follows the last one kept (its
    first from genesis); True if kept now, False if it was already (a redelivery). A gap
    or a fork (another record under a kept sequence) raises :class:`TrainingError` after
    auditing ``training.custody_refused`` in the session (the caller commits it)."""
    digest = record_hash(envelope)
    same = session.exec(select(TrainingCustody).where(
        TrainingCustody.spoke_id == sender,
        TrainingCustody.sequence == record.sequence)).first()
    if same is not None and same.record_sha256 == digest:
        return False
    last = session.exec(select(TrainingCustody).where(TrainingCustody.spoke_id == sender)
                        .order_by(col(TrainingCustody.sequence).desc())).first()
    start = (0, GENESIS) if last is None else (last.sequence, last.record_sha256)
    try:
        if same is not None:
            raise SignatureError(f"a second record under sequence {record.sequence} (a fork)")
        check_chain([envelope], spoke_key, start)
    except SignatureError as exc:
        audit.record(session, ACTOR, "training.custody_refused", record.round_id,
                     spoke=sender, sequence=record.sequence, last_kept=start[0],
                     record_sha256=digest, reason=str(exc))
        raise TrainingError(f"{sender}'s custody chain: {exc}") from None
    session.add(TrainingCustody(
        spoke_id=sender, sequence=record.sequence, record_sha256=digest,
        study_id=record.study_id, round_id=record.round_id,
        object_digest=object_digest, envelope=envelope))
    return True


def record_refusal(session: Session, sender: str, refusal: msg.Refusal) -> None:
    """Audit a spoke's signed refusal of a round (the round goes on without it)."""
    audit.record(session, ACTOR, "training.spoke_refused", refusal.round_id, spoke=sender,
                 study=refusal.study_id, round=refusal.round_index, attempt=refusal.attempt,
                 reason=refusal.reason, detail=refusal.detail)
