"""Read models of spokes, for the API and the pages alike: each spoke with its liveness and
what its latest heartbeat reported."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlmodel import Session, select

from tributary.hub.models import Spoke, SpokeKey, utcnow
from tributary.hub.schemas import SpokeRead
from tributary.hub.services import audit
from tributary.hub.services.liveness import is_online

#: A certificate this close to its expiry is shown as due for renewal (the federation's
#: certificate tool re-issues certificates within the same window).
RENEW_WITHIN = timedelta(days=30)


def _certificate(spoke: Spoke) -> tuple[int | None, str | None]:
    if spoke.certificate_not_after is None:
        return None, None
    not_after = spoke.certificate_not_after
    if not_after.tzinfo is None:
        not_after = not_after.replace(tzinfo=UTC)
    left = not_after - datetime.now(UTC)
    state = "expired" if left <= timedelta(0) else "renew" if left < RENEW_WITHIN else "ok"
    return left // timedelta(days=1), state


def spoke_read(spoke: Spoke, online_seconds: float) -> SpokeRead:
    """``spoke`` as the API shows it: online when heard from within ``online_seconds``."""
    days_left, state = _certificate(spoke)
    return SpokeRead(
        id=spoke.id, name=spoke.name, institution=spoke.institution,
        created_at=spoke.created_at, online=is_online(spoke, online_seconds),
        last_seen_at=spoke.last_seen_at, last_heartbeat_at=spoke.last_heartbeat_at,
        spoke_version=spoke.spoke_version, concurrency=spoke.concurrency,
        queue_depth=spoke.queue_depth, outbox_depth=spoke.outbox_depth,
        running=spoke.running or [], revoked_at=spoke.revoked_at,
        certificate_serial=spoke.certificate_serial,
        certificate_not_after=spoke.certificate_not_after,
        certificate_days_left=days_left, certificate_state=state, sandbox=spoke.sandbox,
        trust_reported_at=spoke.trust_reported_at, trust_required=spoke.trust_required,
        trusted_publishers=spoke.trusted_publishers, capacity=spoke.capacity)


def spoke_reads(session: Session, online_seconds: float) -> list[SpokeRead]:
    """Every spoke, by id."""
    return [spoke_read(s, online_seconds)
            for s in session.exec(select(Spoke).order_by(Spoke.id))]


def revoke_spoke(session: Session, spoke: Spoke, actor: str, reason: str) -> Spoke:
    """Take a spoke out of the federation at the hub: every key it enrolled is revoked (its
    messages are refused from now), it cannot be targeted, and the registry's token service
    refuses it. Its broker and object-store identities are withdrawn by ``tributary pki
    revoke``, which calls this too, so that the three go together. Idempotent."""
    if spoke.revoked_at is None:
        now = utcnow()
        spoke.revoked_at = now
        keys = session.exec(select(SpokeKey).where(SpokeKey.spoke_id == spoke.id,
                                                   SpokeKey.revoked_at == None)).all()  # noqa: E711
        for key in keys:
            key.revoked_at = now
            session.add(key)
        session.add(spoke)
        audit.record(session, actor, "spoke.revoked", spoke.id, reason=reason,
                     keys=[k.keyid for k in keys])
        session.commit()
        session.refresh(spoke)
    return spoke
