"""Audit trail: one row per interaction (API action, message received or sent)."""

from typing import Any

from sqlmodel import Session

from tributary.hub.models import AuditEvent


def record(session: Session, actor: str, action: str, target: str = "",
           **detail: Any) -> AuditEvent:
    """Add an audit event to the session; it commits with the change it describes."""
    event = AuditEvent(actor=actor, action=action, target=target, detail=detail)
    session.add(event)
    return event
