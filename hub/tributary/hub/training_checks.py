"""What the hub checks of a spoke's training answers besides SecAgg+ itself: that a masked
update comes bound to the spoke's signed custody record for exactly this round and object,
and that a spoke's refusal of a round is recorded with its reason. Kept apart from the
round state machine (:mod:`tributary.hub.services.training`), which stays about rounds."""

from __future__ import annotations

from sqlmodel import Session

from tributary.hub.models import TrainingRound, TrainingStudy
from tributary.hub.services import audit
from tributary.hub.services.training import TrainingError
from tributary.protocol.signing import PublicKey, SignatureError
from tributary.protocol.training import rounds as msg
from tributary.protocol.training.custody import UpdateCustody, verify_update_custody

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


def record_refusal(session: Session, sender: str, refusal: msg.Refusal) -> None:
    """Audit a spoke's signed refusal of a round (the round goes on without it)."""
    audit.record(session, ACTOR, "training.spoke_refused", refusal.round_id, spoke=sender,
                 study=refusal.study_id, round=refusal.round_index, attempt=refusal.attempt,
                 reason=refusal.reason, detail=refusal.detail)
