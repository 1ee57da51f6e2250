"""Chain of custody of a result. For every case it finishes, a spoke signs an in-toto
Statement whose subject is the digest of what leaves (``output.json``, or the failure
report) and whose predicate says which image ran on which de-identified input, when, with
what outcome, and the hash of the spoke's previous record: a per-spoke hash chain, so a
record cannot be removed, reordered or forged without the hub (or a third party holding
the spoke's public key) noticing."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from tributary.protocol.messages import ResultMessage
from tributary.protocol.signing import (
    PublicKey,
    SignatureError,
    SigningKey,
    canonical_json,
    envelope_hash,
    sha256_hex,
    sign_statement,
    statement,
    verify_statement,
)

PREDICATE_TYPE = "https://tributary.dev/custody/v1"
GENESIS = "0" * 64


class CustodyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment_id: str
    spoke_id: str
    case_id: str
    attempt: int
    sequence: int
    previous_record_sha256: str
    image_digest: str | None
    participant_sha256: str | None
    input_sha256: str | None
    deid_profile: str | None
    spoke_version: str
    started_at: datetime | None
    finished_at: datetime | None
    status: str
    exit_code: int | None
    failure_reason: str | None


def released_content(result: ResultMessage) -> bytes:
    """The bytes the custody subject digests: everything the result releases."""
    return canonical_json({
        "output": result.output,
        "failure": result.failure.model_dump(mode="json") if result.failure else None,
        "released": result.released,
    })


def sign_custody(key: SigningKey, record: CustodyRecord, result: ResultMessage) -> dict[str, Any]:
    stmt = statement(f"{result.case_id}/output.json", sha256_hex(released_content(result)),
                     PREDICATE_TYPE, record.model_dump(mode="json"))
    return sign_statement(key, stmt)


def verify_custody(envelope: dict[str, Any], keys: list[PublicKey],
                   result: ResultMessage) -> CustodyRecord:
    """Check signature, subject digest and that the record describes this very result."""
    stmt = verify_statement(envelope, keys, PREDICATE_TYPE)
    subjects = stmt.get("subject") or []
    if len(subjects) != 1 or subjects[0].get("digest", {}).get("sha256") != sha256_hex(
            released_content(result)):
        raise SignatureError("custody subject does not match the result's content "
                             "(altered after signing)")
    record = CustodyRecord.model_validate(stmt["predicate"])
    expected = {"experiment_id": result.experiment_id, "spoke_id": result.spoke_id,
                "case_id": result.case_id, "attempt": result.attempt,
                "image_digest": result.image_digest, "status": result.status.value}
    actual = {k: getattr(record, k) for k in expected}
    if actual != expected:
        differing = sorted(k for k in expected if actual[k] != expected[k])
        raise SignatureError(f"custody record does not describe this result: {differing}")
    return record


def record_hash(envelope: dict[str, Any]) -> str:
    return envelope_hash(envelope)
