"""Audit trail: one row per interaction (API action, message received or sent, key enrolled
or revoked), searchable through the API, and the same event appended to the hub's forensic
log (:mod:`tributary.protocol.auditlog`), which unlike a table shows any later edit.

The forensic line is written when :func:`record` is called, inside the caller's transaction
and before it commits, so a transaction that then rolls back leaves a line without a row.
That is deliberate: the log records what was attempted, and the opposite failure, a row
without a line, cannot happen. If the line cannot be written, ``record`` raises and the
change it describes is not committed (fail closed).

Inside :func:`batched` (the results consumer's transactions of many messages), the lines
are held and written together just before the session commits, with one fsync; each event
still has its own line and row, and a batch that rolls back writes no line at all."""

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import String, cast, event, func, insert, or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from tributary.hub.models import AuditEvent, utcnow
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


_HELD = "tributary.audit.held"


def record(session: Session, actor: str, action: str, target: str = "",
           **detail: Any) -> AuditEvent | None:
    """Add an audit event to the session (it commits with the change it describes) and
    append it to the forensic log now; returns its row. Inside :func:`batched` the event is
    held, and its line and row are written just before the commit (None is returned).
    Secret-named detail is redacted in both."""
    clean = redact(detail)
    held: list[dict[str, Any]] | None = session.info.get(_HELD)
    if held is not None:
        held.append({"at": utcnow(), "actor": actor, "action": action, "target": target,
                     "detail": clean})
        return None
    row = AuditEvent(actor=actor, action=action, target=target, detail=clean)
    log = forensic_log(session)
    if log is not None:
        entry = log.append(actor, action, target, clean)
        # The row anchors the log's head (hub/services/anchors.py).
        row.log_seq, row.log_hash = entry["seq"], entry["hash"]
        row.log_name = log_name(log)
    session.add(row)
    return row


def write_held(session: Session) -> None:
    """Append the events held by :func:`batched` to the forensic log (one write, one
    fsync), then insert their rows (one statement). Runs before each commit of the session."""
    held: list[dict[str, Any]] | None = session.info.get(_HELD)
    if not held:
        return
    log = forensic_log(session)
    if log is not None:
        entries = log.append_many([(e["actor"], e["action"], e["target"], e["detail"])
                                   for e in held])
        name = log_name(log)
        for row, entry in zip(held, entries, strict=True):
            row.update(log_seq=entry["seq"], log_hash=entry["hash"], log_name=name)
    session.execute(insert(AuditEvent), held)
    held.clear()


@contextlib.contextmanager
def batched(session: Session) -> Iterator[None]:
    """Hold the session's audit events and write their forensic lines together, just
    before each commit (fail closed: a line that cannot be written stops the commit). Events
    held when the block ends without a commit (a rollback) are dropped with their change."""
    if _HELD in session.info:  # already batching: the outer block writes them
        yield
        return
    session.info[_HELD] = []
    event.listen(session, "before_commit", write_held)
    event.listen(session, "after_rollback", _drop_held)
    try:
        yield
    finally:
        event.remove(session, "before_commit", write_held)
        event.remove(session, "after_rollback", _drop_held)
        session.info.pop(_HELD, None)


def _drop_held(session: Session) -> None:
    """A rollback takes the held events with the changes they describe."""
    held: list[dict[str, Any]] | None = session.info.get(_HELD)
    if held:
        held.clear()


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
