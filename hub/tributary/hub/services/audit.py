"""Audit trail: one row per interaction (API action, message received or sent, key enrolled
or revoked), searchable through the API, and the same event appended to the hub's forensic
log (:mod:`tributary.protocol.auditlog`), which unlike a table shows any later edit.

The forensic line is written when :func:`record` is called, inside the caller's transaction
and before it commits, so a transaction that then rolls back leaves a line without a row.
That is deliberate: the log records what was attempted, and the opposite failure, a row
without a line, cannot happen. If the line cannot be written, ``record`` raises and the
change it describes is not committed (fail closed)."""

import threading
from pathlib import Path
from typing import Any

from sqlalchemy import String, cast, func, or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from tributary.hub.models import AuditEvent
from tributary.hub.settings import default_audit_log
from tributary.protocol.auditlog import AuditLog, redact

_logs: dict[str, AuditLog | None] = {}
_logs_lock = threading.Lock()


def attach_forensic_log(engine: Engine, path: Path | None) -> AuditLog | None:
    """Send the events recorded on ``engine``'s database to the log at ``path`` (None: none).
    Raises :class:`~tributary.protocol.auditlog.AuditLogError` if the log's tail is broken,
    so a hub does not start on top of a tampered log."""
    log = AuditLog(path) if path is not None else None
    with _logs_lock:
        _logs[str(engine.url)] = log
    return log


def forensic_log(session: Session) -> AuditLog | None:
    """The log for the session's database: the attached one, else the default beside it."""
    key = str(session.get_bind().engine.url)
    with _logs_lock:
        if key not in _logs:
            path = default_audit_log(key)
            _logs[key] = AuditLog(path) if path is not None else None
        return _logs[key]


def log_name(log: AuditLog) -> str:
    """How audit rows name the forensic log they were written to."""
    return str(log.path.resolve())


def record(session: Session, actor: str, action: str, target: str = "",
           **detail: Any) -> AuditEvent:
    """Add an audit event to the session (it commits with the change it describes) and
    append it to the forensic log now. Secret-named detail is redacted in both."""
    clean = redact(detail)
    event = AuditEvent(actor=actor, action=action, target=target, detail=clean)
    log = forensic_log(session)
    if log is not None:
        entry = log.append(actor, action, target, clean)
        # The row anchors the log's head (hub/services/anchors.py).
        event.log_seq, event.log_hash = entry["seq"], entry["hash"]
        event.log_name = log_name(log)
    session.add(event)
    return event


def search(session: Session, action: str | None = None, target: str | None = None,
           actor: str | None = None, q: str | None = None, limit: int = 200
           ) -> list[AuditEvent]:
    """Audit events, newest first: those with exactly this action, target and actor, and
    ``q`` anywhere in actor, action, target or detail (ignoring case)."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc())  # type: ignore[union-attr]
    if action:
        query = query.where(AuditEvent.action == action)
    if target:
        query = query.where(AuditEvent.target == target)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if q:
        pattern = f"%{q.lower()}%"
        query = query.where(or_(*(func.lower(column).like(pattern) for column in (
            AuditEvent.actor, AuditEvent.action, AuditEvent.target,
            cast(AuditEvent.detail, String)))))  # type: ignore[arg-type]
    return list(session.exec(query.limit(limit)))
