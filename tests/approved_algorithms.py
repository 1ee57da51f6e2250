"""Registered algorithm versions in a hub database, as the review rule leaves them: what a
training study names (tests that drive the hub's training state machine directly)."""

from __future__ import annotations

from sqlmodel import Session

from tributary.hub.models import Algorithm, utcnow
from tributary.protocol.release import sign_approval
from tributary.protocol.signing import SigningKey


def approved_algorithm(session: Session, name: str = "logreg",
                       repository: str = "registry.local/logreg",
                       digest: str = "sha256:" + "a" * 64,
                       hub_key: SigningKey | None = None, approved: bool = True,
                       release_signature: dict | None = None) -> Algorithm:
    """Add version 1 of ``name`` (approved by ``hub_key`` unless told not to); flushed,
    so its id is set."""
    key = hub_key or SigningKey.generate()
    algorithm = Algorithm(
        name=name, version="1", repository=repository, digest=digest, publisher="Lab",
        release_signature=release_signature,
        approval=sign_approval(key, repository, digest, {"name": name}) if approved else None,
        approved_at=utcnow() if approved else None)
    session.add(algorithm)
    session.flush()
    return algorithm
