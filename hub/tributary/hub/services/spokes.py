"""Read models of spokes, for the API and the pages alike: each spoke with its liveness and
what its latest heartbeat reported."""

from __future__ import annotations

from sqlmodel import Session, select

from tributary.hub.models import Spoke
from tributary.hub.schemas import SpokeRead
from tributary.hub.services.liveness import is_online


def spoke_read(spoke: Spoke, online_seconds: float) -> SpokeRead:
    """``spoke`` as the API shows it: online when heard from within ``online_seconds``."""
    return SpokeRead(
        id=spoke.id, name=spoke.name, institution=spoke.institution,
        created_at=spoke.created_at, online=is_online(spoke, online_seconds),
        last_seen_at=spoke.last_seen_at, last_heartbeat_at=spoke.last_heartbeat_at,
        spoke_version=spoke.spoke_version, concurrency=spoke.concurrency,
        queue_depth=spoke.queue_depth, outbox_depth=spoke.outbox_depth,
        running=spoke.running or [])


def spoke_reads(session: Session, online_seconds: float) -> list[SpokeRead]:
    """Every spoke, by id."""
    return [spoke_read(s, online_seconds)
            for s in session.exec(select(Spoke).order_by(Spoke.id))]
