"""Custody of a masked update: before it announces a masked vector, the spoke signs an
in-toto statement whose subject is the digest of the object it wrote to the store and whose
predicate names the study, round, attempt, image digest and the hash of the spoke's
previous training record: a per-spoke hash chain like the results' (``protocol.custody``),
kept apart from it so the hub's continuity check of results sees no gap. The hub checks the
binding (:func:`verify_update_custody`) before it uses the object, and the chain
(:func:`check_chain`) across a study's records.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tributary.protocol.signing import (
    PublicKey,
    SignatureError,
    SigningKey,
    envelope_hash,
    sign_statement,
    statement,
    verify_statement,
)

PREDICATE_TYPE = "https://tributary.dev/training-custody/v1"
GENESIS = "0" * 64
Sha256 = Field(pattern=r"^[0-9a-f]{64}$")


class UpdateCustody(BaseModel):
    """What a spoke vouches for about one masked update it released."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spoke_id: str = Field(max_length=128)
    study_id: str = Field(max_length=128)
    round_index: int = Field(ge=0)
    attempt: int = Field(ge=1)
    round_id: str = Field(max_length=128)
    #: The training image the update came from (``repository@sha256:...``).
    image_digest: str = Field(max_length=512)
    #: The global model it was trained from (``sha256:...``).
    global_model_digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    #: Where the masked vector is and how long it is.
    location: str = Field(max_length=4096)
    size: int = Field(ge=0)
    num_examples: int = Field(ge=1)
    #: Position in the spoke's training chain (1 for its first record) and the hash of the
    #: record before it (:data:`GENESIS` for the first).
    sequence: int = Field(ge=1)
    previous_record_sha256: str = Sha256
    spoke_version: str = Field(max_length=64)
    created_at: datetime


def sign_update_custody(key: SigningKey, record: UpdateCustody,
                        object_sha256: str) -> dict[str, Any]:
    """The DSSE envelope of the statement binding ``record`` to the object's SHA-256."""
    return sign_statement(key, statement(record.location, object_sha256, PREDICATE_TYPE,
                                         record.model_dump(mode="json")))


def record_hash(envelope: dict[str, Any]) -> str:
    """What the next record of the chain names as its previous one."""
    return envelope_hash(envelope)


def verify_update_custody(envelope: dict[str, Any], spoke_key: PublicKey, *, spoke_id: str,
                          study_id: str, round_id: str, round_index: int, attempt: int,
                          image_digest: str, object_digest: str,
                          location: str) -> UpdateCustody:
    """The record, if ``spoke_key`` signed a statement about exactly this object
    (``sha256:...``) at ``location`` for exactly this round; else :class:`SignatureError`."""
    stmt = verify_statement(envelope, [spoke_key], PREDICATE_TYPE)
    subjects = stmt.get("subject") or []
    if (len(subjects) != 1 or not isinstance(subjects[0], dict)
            or subjects[0].get("digest", {}).get("sha256") != object_digest.removeprefix(
                "sha256:")):
        raise SignatureError("custody subject is not the announced masked object")
    try:
        record = UpdateCustody.model_validate(stmt.get("predicate"))
    except ValidationError as exc:
        raise SignatureError(f"malformed training custody record: {exc.errors()[:2]}") from None
    expected = {"spoke_id": spoke_id, "study_id": study_id, "round_id": round_id,
                "round_index": round_index, "attempt": attempt, "image_digest": image_digest,
                "location": location}
    differing = sorted(k for k, v in expected.items() if getattr(record, k) != v)
    if differing or subjects[0].get("name") != location:
        raise SignatureError(f"custody record does not describe this update: "
                             f"{differing or ['subject name']}")
    return record


def check_chain(envelopes: Sequence[dict[str, Any]], spoke_key: PublicKey,
                start: tuple[int, str] = (0, GENESIS)) -> tuple[int, str]:
    """Check that ``envelopes`` (one spoke's records, in order) are signed by it and follow
    each other without gap or reordering from ``start`` (sequence, hash of the record
    before). Returns the chain head after the last one; raises :class:`SignatureError`."""
    sequence, previous = start
    for envelope in envelopes:
        stmt = verify_statement(envelope, [spoke_key], PREDICATE_TYPE)
        try:
            record = UpdateCustody.model_validate(stmt.get("predicate"))
        except ValidationError:
            raise SignatureError("malformed training custody record") from None
        if record.sequence != sequence + 1 or record.previous_record_sha256 != previous:
            raise SignatureError(
                f"training custody chain broken at sequence {record.sequence} (expected "
                f"{sequence + 1} after {previous[:12]}...)")
        sequence, previous = record.sequence, record_hash(envelope)
    return sequence, previous
