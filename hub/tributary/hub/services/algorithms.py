"""Reading the registered algorithm versions and their reviews, for the API and the pages
alike (registration, review and revocation are in :mod:`tributary.hub.services.approval`)."""

from __future__ import annotations

import base64
import json
from typing import Any

from sqlmodel import Session, select

from tributary.hub.models import Algorithm, Publisher, Review
from tributary.protocol.signing import SignatureError, envelope_signer


def algorithms(session: Session) -> list[Algorithm]:
    """Every registered version, by name and version."""
    return list(session.exec(select(Algorithm).order_by(Algorithm.name, Algorithm.version)))


def reviews(session: Session, algorithm_id: int) -> list[Review]:
    return list(session.exec(select(Review).where(Review.algorithm_id == algorithm_id)))


def state(algorithm: Algorithm) -> str:
    """Revoked, approved or pending (reviews still missing), in that order of precedence."""
    if algorithm.revoked_at is not None:
        return "revoked"
    return "approved" if algorithm.approval is not None else "pending"


def versions(session: Session, name: str) -> list[Algorithm]:
    """Every registered version of the algorithm ``name``, newest registration first."""
    return list(session.exec(select(Algorithm).where(Algorithm.name == name)
                             .order_by(Algorithm.id.desc())))  # type: ignore[union-attr]


def publishers(session: Session) -> list[Publisher]:
    return list(session.exec(select(Publisher).order_by(Publisher.name)))


def signature_facts(envelope: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a stored DSSE statement says, for display: the signing key id, the subject
    digests and the predicate. It was verified when it was stored (release signatures at
    registration, approvals when the hub signed them); this only reads it."""
    if not envelope:
        return None
    try:
        keyid = envelope_signer(envelope)
        stmt = json.loads(base64.b64decode(envelope["payload"]))
        subjects = [s["digest"]["sha256"] for s in stmt.get("subject") or []]
        return {"keyid": keyid, "subjects": subjects, "predicate": stmt.get("predicate") or {},
                "predicate_type": stmt.get("predicateType", "")}
    except (SignatureError, KeyError, TypeError, ValueError):
        return {"keyid": "?", "subjects": [], "predicate": {}, "predicate_type": "unreadable"}
