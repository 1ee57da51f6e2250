"""Audit log anchors: the heads of the hub's and the spokes' forensic logs, kept in the
hub's database, so that a log cut at its end or deleted and started again no longer
verifies (``tributary audit verify LOG --anchors``): a hash chain alone cannot show either.

The hub's head is the log entry of its newest audit row (each row stores its entry's seq,
hash and log); a spoke's is the highest head its heartbeats reported. A spoke head that goes
backwards (a smaller seq, or the same seq with another hash) does not replace the anchor and
is recorded as an audit event (once, not again while that log grows back towards the
anchor), which itself stays in the hub's own anchored log."""

from __future__ import annotations

from collections.abc import Iterable

from sqlmodel import Session, col, select

from tributary.hub.models import AuditEvent, Spoke, utcnow
from tributary.hub.services import audit
from tributary.protocol.auditlog import AuditAnchors, AuditHead, AuditLog


def hub_head(session: Session, log: AuditLog | None = None) -> AuditHead | None:
    """The entry of the newest audit row written to ``log`` (default: the session's
    forensic log), or None if there is none."""
    log = log if log is not None else audit.forensic_log(session)
    if log is None:
        return None
    event = session.exec(select(AuditEvent).where(AuditEvent.log_name == audit.log_name(log))
                         .where(col(AuditEvent.log_seq).is_not(None))
                         .order_by(col(AuditEvent.id).desc()).limit(1)).first()
    if event is None or event.log_seq is None or event.log_hash is None:
        return None
    return AuditHead(seq=event.log_seq, hash=event.log_hash)


def spoke_head(spoke: Spoke) -> AuditHead | None:
    if spoke.audit_head_seq is None or spoke.audit_head_hash is None:
        return None
    return AuditHead(seq=spoke.audit_head_seq, hash=spoke.audit_head_hash)


def note_spoke_head(session: Session, spoke: Spoke, head: AuditHead | None) -> None:
    """Keep ``head`` as the spoke's anchor if it moves the log forward; record a regression
    once (the caller commits)."""
    if head is None:
        return
    kept = spoke_head(spoke)
    if kept is None or head.seq > kept.seq:
        spoke.audit_head_seq, spoke.audit_head_hash = head.seq, head.hash
        spoke.audit_head_at = utcnow()
    elif head != kept:
        # Recorded when a log goes backwards, not again for each entry it then grows by.
        refused = spoke.audit_head_refused
        growing = refused is not None and refused.partition(":")[0].isdigit() \
            and int(refused.partition(":")[0]) < head.seq < kept.seq
        spoke.audit_head_refused = f"{head.seq}:{head.hash}"
        if not growing and refused != spoke.audit_head_refused:
            audit.record(session, f"spoke:{spoke.id}", "spoke.audit_log_regressed", spoke.id,
                         anchored_seq=kept.seq, anchored_hash=kept.hash,
                         reported_seq=head.seq, reported_hash=head.hash)
    session.add(spoke)


def anchors(session: Session, spoke_ids: Iterable[str] | None = None) -> AuditAnchors:
    """The hub's head and the spokes' (all, or those named)."""
    query = select(Spoke)
    if spoke_ids is not None:
        query = query.where(col(Spoke.id).in_(list(spoke_ids)))
    spokes = {s.id: head for s in session.exec(query) if (head := spoke_head(s)) is not None}
    return AuditAnchors(hub=hub_head(session), spokes=spokes, at=utcnow())


def check_hub_log(session: Session, log: AuditLog) -> str | None:
    """At start: whether the hub's log still reaches the head its database anchored. If
    not (cut, deleted and recreated, restored from an old copy), say so and record it as
    ``hub.audit_log_regressed`` (the caller commits), so the event outlives the evidence.
    Only the log's last entry is read: a full check is ``tributary audit verify``."""
    held = hub_head(session, log)
    if held is None:
        return None
    now = log.head()
    if now.seq > held.seq or now == held:
        return None
    problem = (f"the forensic log {log.path} ends at seq {now.seq}, before the anchored "
               f"head seq {held.seq} hash {held.hash}: it was cut, replaced or restored")
    audit.record(session, "hub", "hub.audit_log_regressed", str(log.path),
                 anchored_seq=held.seq, anchored_hash=held.hash, log_seq=now.seq,
                 log_hash=now.hash)
    return problem
