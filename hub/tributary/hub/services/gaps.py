"""Gaps in a spoke's custody chain: records that never reached the hub because their result
message was lost on the broker (removed, expired, dead-lettered). A gap is never a reason to
refuse the spoke's later results for ever: the hub records it, asks the spoke to resend the
missing records from its journal (which keeps them), and accepts the chain again once they
arrive. If they cannot come back, an administrator accepts the gap explicitly (audited): the
chain continues after it, and cases still without a result are settled as lost.

A target never completes while it has cases without a result, even once its spoke says it
is done: that is how a lost *last* result is noticed (no later record shows the gap)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from tributary.hub.models import (
    TERMINAL_TARGET_STATES,
    CaseResult,
    CaseState,
    CustodyGap,
    ExperimentTarget,
    GapState,
    SpokeChain,
    TargetState,
    utcnow,
)
from tributary.hub.services import audit
from tributary.protocol.broker import StompClient, publish_with_retry
from tributary.protocol.destinations import spoke_queue
from tributary.protocol.messages import ProtocolError, ResendRecordsMessage
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal

log = logging.getLogger(__name__)

#: A resend request not answered (by the missing records) within this long is sent again.
RESEND_INTERVAL = timedelta(seconds=30)
#: How long a resend request waits in the spoke's queue before the broker drops it.
RESEND_EXPIRY = timedelta(days=7)
#: The chain head after an accepted gap: the next record may follow any record hash.
ACCEPTED_GAP_HEAD = "gap-accepted"
#: The failure reason of a case whose result was lost with an accepted gap.
LOST_IN_TRANSIT = "lost_in_transit"
UNSETTLED = (CaseState.QUEUED, CaseState.RUNNING)
#: Targets settling leaves alone: already settled, or being cancelled.
SETTLING_DONE = [*TERMINAL_TARGET_STATES, TargetState.CANCELLING]


class GapDetected(ProtocolError):
    """A result whose custody record comes after records the hub never received. The
    message is not stored now: the spoke resends it with the missing ones."""

    def __init__(self, spoke_id: str, first_missing: int, last_missing: int) -> None:
        super().__init__(f"custody chain gap: records {first_missing}..{last_missing} of "
                         f"{spoke_id} never arrived; asked the spoke to resend them")
        self.spoke_id, self.first_missing, self.last_missing = (spoke_id, first_missing,
                                                                last_missing)


class NotAllowed(ValueError):
    """The gap cannot be accepted (unknown, or no longer open)."""


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def open_gaps(session: Session, spoke_id: str) -> list[CustodyGap]:
    return list(session.exec(select(CustodyGap).where(
        CustodyGap.spoke_id == spoke_id, CustodyGap.state == GapState.OPEN.value)
        .order_by(CustodyGap.first_missing)).all())  # type: ignore[arg-type]


def spokes_with_open_gaps(session: Session) -> list[str]:
    return sorted(set(session.exec(select(CustodyGap.spoke_id).where(
        CustodyGap.state == GapState.OPEN.value)).all()))


def record_gap(session: Session, gap: GapDetected) -> CustodyGap:
    """Note a gap a later record revealed (once: the same gap seen again is one row)."""
    for row in open_gaps(session, gap.spoke_id):
        if row.first_missing == gap.first_missing:
            # The first later record seen bounds the gap: records after it were refused
            # only because of the gap, they are not missing from the spoke's chain.
            if row.last_missing is None or row.last_missing > gap.last_missing:
                row.last_missing = gap.last_missing
                session.add(row)
            return row
    row = CustodyGap(spoke_id=gap.spoke_id, first_missing=gap.first_missing,
                     last_missing=gap.last_missing)
    session.add(row)
    audit.record(session, "hub", "custody.gap", gap.spoke_id, first_missing=gap.first_missing,
                 last_missing=gap.last_missing)
    return row


def chain_advanced(session: Session, spoke_id: str, sequence: int) -> None:
    """A record arrived in order: gaps it closes are resolved."""
    for row in open_gaps(session, spoke_id):
        if row.last_missing is not None and row.last_missing <= sequence:
            row.state, row.settled_at = GapState.RESOLVED.value, utcnow()
            session.add(row)
            audit.record(session, "hub", "custody.gap_resolved", spoke_id,
                         first_missing=row.first_missing, last_missing=row.last_missing)


def unsettled(session: Session, target: ExperimentTarget) -> list[CaseResult]:
    return list(session.exec(select(CaseResult).where(
        CaseResult.experiment_id == target.experiment_id,
        CaseResult.spoke_id == target.spoke_id,
        CaseResult.state.in_(UNSETTLED))).all())  # type: ignore[attr-defined]


def settle_targets(session: Session, spoke_ids: str | Iterable[str]) -> None:
    """Complete the spokes' targets they said were done once every case has its result;
    while results are missing, keep one open gap after the chain head, so the hub asks for
    them. Two queries for any number of spokes (a batch of results settles once)."""
    spokes = sorted({spoke_ids} if isinstance(spoke_ids, str) else set(spoke_ids))
    if not spokes:
        return
    session.flush()
    open_targets: dict[str, list[ExperimentTarget]] = {}
    for target in session.exec(select(ExperimentTarget).where(
            col(ExperimentTarget.spoke_id).in_(spokes),
            col(ExperimentTarget.spoke_completed_at).is_not(None),
            col(ExperimentTarget.state).not_in(SETTLING_DONE))):
        open_targets.setdefault(target.spoke_id, []).append(target)
    gaps_by_spoke: dict[str, list[CustodyGap]] = {}
    for row in session.exec(select(CustodyGap).where(
            col(CustodyGap.spoke_id).in_(spokes), CustodyGap.state == GapState.OPEN.value)
            .order_by(col(CustodyGap.first_missing))):
        gaps_by_spoke.setdefault(row.spoke_id, []).append(row)
    for spoke_id in spokes:
        if spoke_id in open_targets or spoke_id in gaps_by_spoke:
            _settle_spoke(session, spoke_id, open_targets.get(spoke_id, []),
                          gaps_by_spoke.get(spoke_id, []))


def _settle_spoke(session: Session, spoke_id: str, targets: list[ExperimentTarget],
                  open_rows: list[CustodyGap]) -> None:
    waiting = 0
    for target in targets:
        missing = session.exec(select(func.count()).select_from(CaseResult).where(
            CaseResult.experiment_id == target.experiment_id,
            CaseResult.spoke_id == target.spoke_id,
            col(CaseResult.state).in_(UNSETTLED))).one()
        if missing == 0:
            target.state, target.reason = TargetState.COMPLETED, None
        else:
            waiting += 1
            target.state = TargetState.ACCEPTED
            target.reason = (f"the spoke reports every case done, but {missing} result(s) "
                             "are missing; the spoke is asked to resend them")
        target.updated_at = utcnow()
        session.add(target)
    trailing = [g for g in open_rows if g.last_missing is None]
    if not waiting:
        for row in trailing:
            row.state, row.settled_at = GapState.RESOLVED.value, utcnow()
            session.add(row)
            audit.record(session, "hub", "custody.gap_resolved", spoke_id,
                         first_missing=row.first_missing)
        return
    chain = session.get(SpokeChain, spoke_id)
    after = (chain.sequence if chain else 0) + 1
    if trailing:
        trailing[0].first_missing = max(trailing[0].first_missing, after)
        session.add(trailing[0])
    elif not open_rows:
        session.add(CustodyGap(spoke_id=spoke_id, first_missing=after))
        audit.record(session, "hub", "custody.gap", spoke_id, first_missing=after,
                     last_missing=None, why="the spoke is done but results are missing")


def send_resend(client: StompClient, key: SigningKey, spoke_id: str,
                from_sequence: int) -> str:
    """Publish one signed resend request to the spoke's queue; returns its message id."""
    message = ResendRecordsMessage(
        spoke_id=spoke_id, from_sequence=from_sequence,
        reason=f"custody records from {from_sequence} on never reached the hub")
    expires = int((utcnow() + RESEND_EXPIRY).timestamp() * 1000)
    publish_with_retry(client, spoke_queue(spoke_id, client.settings.federation),
                       seal(message, key), {"tributary-kind": message.kind,
                                            "tributary-message-id": message.message_id,
                                            "expires": str(expires)})
    return message.message_id


def request_resends(session: Session, client: StompClient, key: SigningKey,
                    spoke_id: str, min_age: timedelta = timedelta(0)) -> int:
    """Ask the spoke to resend every open gap not asked about recently and detected at
    least ``min_age`` ago (a gap that competing consumers close within seconds is never
    asked about); returns how many requests were sent. Committed per request, after it was
    published."""
    sent = 0
    now = utcnow()
    for row in open_gaps(session, spoke_id):
        if row.resend_requested_at is not None and \
                now - _aware(row.resend_requested_at) < RESEND_INTERVAL:
            continue
        if now - _aware(row.detected_at) < min_age:
            continue
        message_id = send_resend(client, key, spoke_id, row.first_missing)
        row.resend_requested_at, row.resend_requests = now, row.resend_requests + 1
        session.add(row)
        audit.record(session, "hub", "custody.resend_requested", spoke_id,
                     from_sequence=row.first_missing, message_id=message_id,
                     requests=row.resend_requests)
        session.commit()
        sent += 1
    return sent


def accept(session: Session, gap_id: int, spoke_id: str, actor: str,
           reason: str) -> tuple[CustodyGap, list[str]]:
    """An administrator accepts that the gap's records are lost: the chain continues after
    it, the spoke is asked (by the caller) for the records after it, and cases of targets
    the spoke said were done, still without a result, are settled as lost in transit (a
    result that arrives later still replaces that). Returns the gap and the experiments
    whose targets it settled. The caller then asks the spoke for the records after the gap
    (:func:`send_resend`): results that followed it were refused while it was open."""
    gap = session.get(CustodyGap, gap_id)
    if gap is None or gap.spoke_id != spoke_id:
        raise NotAllowed(f"spoke {spoke_id} has no custody gap {gap_id}")
    if gap.state != GapState.OPEN.value:
        raise NotAllowed(f"the gap is {gap.state}, not open")
    gap.state, gap.settled_at = GapState.ACCEPTED.value, utcnow()
    gap.accepted_by, gap.accepted_reason = actor, reason
    chain = session.get(SpokeChain, spoke_id) or SpokeChain(
        spoke_id=spoke_id, sequence=0, record_sha256="")
    if gap.last_missing is not None and chain.sequence < gap.last_missing:
        chain.sequence, chain.record_sha256 = gap.last_missing, ACCEPTED_GAP_HEAD
        session.add(chain)
    lost: dict[str, list[str]] = {}
    for target in session.exec(select(ExperimentTarget).where(
            ExperimentTarget.spoke_id == spoke_id,
            ExperimentTarget.spoke_completed_at.is_not(None))).all():  # type: ignore[union-attr]
        if target.state in TERMINAL_TARGET_STATES:
            continue
        for row in unsettled(session, target):
            row.state = CaseState.FAILED
            row.failure = {"reason": LOST_IN_TRANSIT, "detail": f"the result never reached "
                           f"the hub; custody gap accepted by {actor}: {reason}"[:2000]}
            row.note = f"lost in transit (custody gap {gap.id} accepted by {actor})"
            session.add(row)
            lost.setdefault(target.experiment_id, []).append(row.case_id)
    gap.lost_cases = lost
    session.add(gap)
    audit.record(session, actor, "custody.gap_accepted", spoke_id, gap=gap.id,
                 first_missing=gap.first_missing, last_missing=gap.last_missing,
                 reason=reason, lost_cases=lost)
    settle_targets(session, spoke_id)
    session.commit()
    return gap, list(lost)
