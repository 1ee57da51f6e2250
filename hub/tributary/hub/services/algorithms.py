"""Reading the registered algorithm versions and their reviews, for the API and the pages
alike (registration, review and revocation are in :mod:`tributary.hub.services.approval`)."""

from __future__ import annotations

from sqlmodel import Session, select

from tributary.hub.models import Algorithm, Review


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
