"""Private set intersection at the hub (docs/cohorts.md#private-set-intersection): the hub
asks the spokes, relays what they send each other and shows a suppressed result. It never
holds an identifier: relayed payloads are encrypted between the two spokes (only the signed
key-agreement ``hello`` is not, and it holds an ephemeral public key), kept only until
forwarded, and audited by size, step and parties.

A relay is accepted only from a participant that reported ``approved``, to another
participant, between the leader and a partner, in the direction its step goes, while the
PSI is neither finished nor expired (the addressee may still wait for its steward: it
keeps what arrives until then)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from tributary.hub.models import InboundMessage, PsiMember, PsiRelayRecord, PsiRun, SpokeKey, utcnow
from tributary.hub.schemas import PsiRead, PsiSpokeRead
from tributary.hub.services import access_grants, audit, credentials
from tributary.hub.services.access_grants import AccessRefused
from tributary.protocol.broker import StompClient, publish_with_retry
from tributary.protocol.cohorts.access import StudyKind
from tributary.protocol.cohorts.psi import (
    PsiForward,
    PsiMode,
    PsiParticipant,
    PsiRelay,
    PsiRequest,
    PsiStatus,
    PsiStep,
)
from tributary.protocol.destinations import spoke_queue
from tributary.protocol.messages import ProtocolError
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal

#: Member states a spoke reports that let it relay.
_TAKING_PART = {"approved", "done"}
_FINAL = {"done", "refused", "failed"}


class PsiRejected(ProtocolError):
    """A PSI message the hub will not accept or relay."""


class PsiInvalid(ValueError):
    """A PSI request the hub will not create (unknown or unenrolled spokes...)."""


def _pem(session: Session, spoke_id: str) -> str | None:
    rows = session.exec(select(SpokeKey).where(SpokeKey.spoke_id == spoke_id,
                                               col(SpokeKey.revoked_at).is_(None))).all()
    return rows[0].public_key_pem if len(rows) == 1 else None


def create(session: Session, mode: str, spoke_ids: list[str], purpose: str, actor: str,
           expires_in: timedelta, access_request_id: str | None = None,
           access_required: bool = False) -> PsiRun:
    """A new PSI, once its spokes can take part and its access request (``access_required``:
    the hub asks for one) allows linkage between them; else :class:`PsiInvalid` or
    :class:`AccessRefused` (audited, committed, nothing created)."""
    ids = list(dict.fromkeys(spoke_ids))
    if len(ids) < 2:
        raise PsiInvalid("a PSI needs at least two different spokes")
    missing = [s for s in ids if _pem(session, s) is None]
    if missing:
        raise PsiInvalid(f"spokes unknown or without exactly one active key: {', '.join(missing)}")
    try:
        access_grants.check(session, access_request_id, actor, access_grants.LaunchAsk(
            kind=StudyKind.LINKAGE, spokes=ids), access_required)
    except AccessRefused as exc:
        audit.record(session, actor, "psi.launch_refused", purpose[:80], spokes=ids,
                     access_request=access_request_id, condition=exc.condition,
                     reason=exc.reason)
        session.commit()
        raise
    run = PsiRun(id=f"psi-{uuid.uuid4().hex[:12]}", mode=PsiMode(mode).value, purpose=purpose,
                 leader=ids[0], created_by=actor, expires_at=utcnow() + expires_in,
                 access_request_id=access_request_id)
    session.add(run)
    session.flush()
    for position, spoke_id in enumerate(ids):
        session.add(PsiMember(psi_id=run.id, spoke_id=spoke_id, position=position))
    audit.record(session, actor, "psi.requested", run.id, mode=run.mode, spokes=ids,
                 leader=ids[0], purpose=purpose, access_request=access_request_id)
    session.commit()
    return run


def members(session: Session, psi_id: str) -> list[PsiMember]:
    return list(session.exec(select(PsiMember).where(PsiMember.psi_id == psi_id)
                             .order_by(col(PsiMember.position))).all())


def request_message(session: Session, run: PsiRun, spoke_id: str) -> PsiRequest:
    """The request for one participant, naming every participant's enrolled key."""
    participants = [PsiParticipant(spoke_id=m.spoke_id, public_key_pem=_pem(session, m.spoke_id)
                                   or "") for m in members(session, run.id)]
    return PsiRequest(psi_id=run.id, spoke_id=spoke_id, mode=PsiMode(run.mode),
                      participants=participants, purpose=run.purpose,
                      requested_by=run.created_by, expires_at=run.expires_at)


def publish(session: Session, client: StompClient, key: SigningKey, run: PsiRun) -> None:
    """Send the signed request to each spoke not yet asked (repeatable after an outage)."""
    for member in members(session, run.id):
        if member.state != "pending":
            continue
        message = request_message(session, run, member.spoke_id)
        headers = {"tributary-kind": message.kind}
        if run.expires_at is not None:
            headers["expires"] = str(int(_aware(run.expires_at).timestamp() * 1000))
        publish_with_retry(client, spoke_queue(member.spoke_id, client.settings.federation),
                           seal(message, key), headers)
        member.state, member.request_message_id = "published", message.message_id
        member.updated_at = utcnow()
        session.add(member)
        audit.record(session, "hub", "message.sent", run.id, kind=message.kind,
                     spoke=member.spoke_id, message_id=message.message_id)
        session.commit()


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _member(session: Session, psi_id: str, spoke_id: str) -> tuple[PsiRun, PsiMember]:
    run = session.get(PsiRun, psi_id)
    member = session.get(PsiMember, (psi_id, spoke_id)) if run else None
    if run is None or member is None:
        raise PsiRejected(f"PSI {psi_id!r} does not include spoke {spoke_id!r}")
    return run, member


def ingest_relay(session: Session, message: PsiRelay) -> bool:
    """Check a spoke's relay request and keep it for forwarding (same transaction as the
    batch); :class:`PsiRejected` before anything changes."""
    run, sender = _member(session, message.psi_id, message.spoke_id)
    _run, receiver = _member(session, message.psi_id, message.to_spoke)
    if run.state not in ("requested", "running") or sender.state not in _TAKING_PART:
        raise PsiRejected(f"PSI {run.id} is {run.state} and {sender.spoke_id} is "
                          f"{sender.state}: nothing is relayed")
    if run.expires_at is not None and _aware(run.expires_at) < utcnow():
        raise PsiRejected(f"PSI {run.id} expired")
    for spoke_id in (message.spoke_id, message.to_spoke):  # a lapsed member is sent nothing
        lapsed = credentials.member_refusal(session, spoke_id)
        if lapsed is not None:
            raise PsiRejected(f"PSI {run.id}: {spoke_id}: {lapsed}")
    if run.leader not in (message.spoke_id, message.to_spoke) or sender is receiver:
        raise PsiRejected("PSI messages go between the leader and one partner only")
    from_leader = message.spoke_id == run.leader
    allowed = {PsiStep.HELLO, PsiStep.REQUEST, PsiStep.LINK} if from_leader else {
        PsiStep.HELLO, PsiStep.RESPONSE}
    if message.step not in allowed or (message.step == PsiStep.LINK
                                       and run.mode != PsiMode.INTERSECTION.value):
        raise PsiRejected(f"a {message.step.value} may not go from {message.spoke_id} "
                          f"to {message.to_spoke}")
    session.add(InboundMessage(message_id=message.message_id, kind=message.kind,
                               spoke_id=message.spoke_id))
    session.add(PsiRelayRecord(relay_message_id=message.message_id, psi_id=run.id,
                               from_spoke=message.spoke_id, to_spoke=message.to_spoke,
                               step=message.step.value, size=len(message.payload),
                               payload=message.payload))
    audit.record(session, message.spoke_id, "psi.relay_received", run.id,
                 step=message.step.value, to_spoke=message.to_spoke,
                 size=len(message.payload), message_id=message.message_id)
    return True


def ingest_status(session: Session, message: PsiStatus) -> bool:
    run, member = _member(session, message.psi_id, message.spoke_id)
    session.add(InboundMessage(message_id=message.message_id, kind=message.kind,
                               spoke_id=message.spoke_id))
    if member.state in _FINAL:
        duplicate = True
    else:
        duplicate = False
        member.state, member.reason = message.state.value, message.reason
        member.count, member.fewer_than = message.count, message.fewer_than
        member.updated_at = utcnow()
        session.add(member)
    audit.record(session, message.spoke_id, "psi.status", run.id, state=message.state.value,
                 reason=message.reason, count=message.count, fewer_than=message.fewer_than,
                 message_id=message.message_id, duplicate=duplicate)
    if not duplicate:
        session.flush()
        _settle(session, run)
    return not duplicate


def withdraw(session: Session, psi_id: str, spoke_id: str, reason: str) -> bool:
    """End a member's part in an unfinished PSI (its membership lapsed): it fails, so the
    run fails (a PSI needs every party); whether it changed anything. Audited."""
    run, member = _member(session, psi_id, spoke_id)
    if run.state not in ("requested", "running") or member.state in _FINAL:
        return False
    member.state, member.reason, member.updated_at = "failed", reason, utcnow()
    session.add(member)
    audit.record(session, "hub", "psi.member_withdrawn", run.id, spoke=spoke_id,
                 reason=reason)
    session.flush()
    _settle(session, run)
    return True


def _settle(session: Session, run: PsiRun) -> None:
    rows = members(session, run.id)
    states = {m.state for m in rows}
    leader = rows[0]
    if "refused" in states:
        state = "refused"
    elif "failed" in states:
        state = "failed"
    elif leader.state == "done" and (run.mode == PsiMode.CARDINALITY.value
                                     or states == {"done"}):
        state = "done"
    elif all(m.state in _TAKING_PART for m in rows):
        state = "running"
    else:
        state = "requested"
    if state != run.state:
        run.state = state
        session.add(run)
        audit.record(session, "hub", f"psi.{state}", run.id)


def pending_forwards(session: Session) -> list[PsiRelayRecord]:
    return list(session.exec(select(PsiRelayRecord)
                             .where(col(PsiRelayRecord.forwarded_at).is_(None))
                             .order_by(col(PsiRelayRecord.id)).limit(100)).all())


def forward_message(record: PsiRelayRecord) -> PsiForward:
    assert record.payload is not None
    return PsiForward(psi_id=record.psi_id, spoke_id=record.to_spoke,
                      from_spoke=record.from_spoke, step=PsiStep(record.step),
                      payload=record.payload, relay_message_id=record.relay_message_id)


def forwarded_now(session: Session, record: PsiRelayRecord, message: PsiForward) -> None:
    """The broker took the forward: keep its size and parties, drop its payload."""
    record.forwarded_at, record.payload = utcnow(), None
    record.forward_message_id = message.message_id
    session.add(record)


def forward_pending(session: Session, client: StompClient, key: SigningKey) -> int:
    """Publish each kept relay to its addressee's queue as a hub-signed forward, in the
    order received, then drop its payload; raises PublishError (the rest waits)."""
    forwarded = 0
    for record in pending_forwards(session):
        message = forward_message(record)
        publish_with_retry(client, spoke_queue(record.to_spoke, client.settings.federation),
                           seal(message, key), {"tributary-kind": message.kind})
        forwarded_now(session, record, message)
        audit.record(session, "hub", "psi.relayed", record.psi_id, step=record.step,
                     from_spoke=record.from_spoke, to_spoke=record.to_spoke, size=record.size,
                     relay_message_id=record.relay_message_id,
                     message_id=message.message_id)
        session.commit()
        forwarded += 1
    return forwarded


def result(run: PsiRun, rows: list[PsiMember]) -> tuple[int | None, int | None, str]:
    """(count, fewer_than, text): the leader's size in cardinality mode; in intersection
    mode the linked cohort every spoke reports, suppressed if any site suppressed it."""
    if run.state != "done":
        return None, None, run.state if run.state in ("refused", "failed") else "pending"
    reporting = rows[:1] if run.mode == PsiMode.CARDINALITY.value else rows
    bounds = [m.fewer_than for m in reporting if m.fewer_than is not None]
    if bounds:
        return None, max(bounds), f"fewer than {max(bounds)}"
    counts = {m.count for m in reporting}
    if len(counts) != 1 or None in counts:
        return None, None, "inconsistent: the spokes reported different sizes"
    count = counts.pop()
    text = str(count) if run.mode == PsiMode.CARDINALITY.value else f"linked cohort of {count}"
    return count, None, text


def read(session: Session, run: PsiRun) -> PsiRead:
    rows = members(session, run.id)
    count, fewer_than, text = result(run, rows)
    relayed, size = session.exec(select(func.count(), func.coalesce(func.sum(
        PsiRelayRecord.size), 0)).where(PsiRelayRecord.psi_id == run.id)).one()
    return PsiRead(
        id=run.id, mode=run.mode, purpose=run.purpose, created_by=run.created_by,
        created_at=run.created_at, expires_at=run.expires_at, state=run.state,
        spokes=[PsiSpokeRead(spoke_id=m.spoke_id, leader=m.position == 0, state=m.state,
                             reason=m.reason, updated_at=m.updated_at) for m in rows],
        count=count, fewer_than=fewer_than, result_text=text, relayed_messages=relayed,
        relayed_bytes=size)


def bundle_entries(session: Session, run: PsiRun) -> dict[str, object]:
    """What a study bundle holds of a PSI: its request, states and result, and every audit
    event about it, oldest first (sizes and parties of relays, never their content). The
    PSI's own bundle is these; a vertical study's bundle adds them for the PSI it links."""
    events = audit.search(session, target=run.id, limit=100_000)
    return {"psi": read(session, run).model_dump(mode="json"),
            "access_request": access_grants.bundle_record(session, run.access_request_id),
            "audit": [{"at": e.at.isoformat() if e.at else None, "actor": e.actor,
                       "action": e.action, "detail": e.detail} for e in reversed(events)]}


def reads(session: Session, limit: int | None = None) -> list[PsiRead]:
    query = select(PsiRun).order_by(col(PsiRun.created_at).desc())
    return [read(session, r) for r in session.exec(query.limit(limit))]
