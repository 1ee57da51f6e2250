"""Ingesting what spokes send to the results queue. Every change is idempotent: a message
id seen before is ignored, and a case that already has a result for an attempt keeps it, so
redeliveries and duplicates never count twice. Heartbeats and progress reports are
ephemeral (sent non-persistent): they update liveness and progress, newest wins."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlmodel import Session, select

from tributary.hub import tasks
from tributary.hub.models import (
    FINAL_CASE_STATES,
    TERMINAL_TARGET_STATES,
    Algorithm,
    CaseAttempt,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    InboundMessage,
    QuarantinedMessage,
    Spoke,
    SpokeChain,
    TargetState,
    utcnow,
)
from tributary.hub.services import anchors, audit, debounce, gaps
from tributary.hub.services.counts import ingest_count_reply
from tributary.hub.services.enrolment import active_keys
from tributary.protocol.custody import GENESIS, record_hash, verify_custody
from tributary.protocol.messages import (
    CaseProgressMessage,
    CaseStartedMessage,
    CaseStatus,
    CountReply,
    ExperimentStatusMessage,
    FailureReason,
    HeartbeatMessage,
    ProtocolError,
    ResultMessage,
)
from tributary.protocol.messages import (
    ExperimentState as SpokeExperimentState,
)
from tributary.protocol.signing import SignatureError

log = logging.getLogger(__name__)

SpokeMessage = (ExperimentStatusMessage | CaseStartedMessage | ResultMessage | CountReply
                | CaseProgressMessage | HeartbeatMessage)
ExperimentMessage = ExperimentStatusMessage | CaseStartedMessage | ResultMessage


class Rejected(ProtocolError):
    """A well-formed message the hub will not accept (unknown spoke or experiment)."""


def _case(session: Session, experiment_id: str, spoke_id: str, case_id: str) -> CaseResult:
    row = session.exec(select(CaseResult).where(
        CaseResult.experiment_id == experiment_id, CaseResult.spoke_id == spoke_id,
        CaseResult.case_id == case_id)).first()
    if row is None:
        row = CaseResult(experiment_id=experiment_id, spoke_id=spoke_id, case_id=case_id)
    return row


def _spoke(session: Session, spoke_id: str) -> Spoke:
    spoke = session.get(Spoke, spoke_id)
    if spoke is None:
        raise Rejected(f"message from unregistered spoke {spoke_id!r}")
    return spoke


def _target(session: Session, message: ExperimentMessage | CaseProgressMessage
            ) -> ExperimentTarget:
    _spoke(session, message.spoke_id)
    target = session.get(ExperimentTarget, (message.experiment_id, message.spoke_id))
    if target is None:
        raise Rejected(f"experiment {message.experiment_id!r} does not target spoke "
                       f"{message.spoke_id!r}")
    return target


def ingest(session: Session, message: SpokeMessage) -> bool:
    """Apply one message; False if it was a duplicate (or a stale ephemeral report)."""
    if isinstance(message, HeartbeatMessage):
        return _apply_heartbeat(session, message)
    if isinstance(message, CaseProgressMessage):
        return _apply_progress(session, message)
    if session.get(InboundMessage, message.message_id) is not None:
        subject = (message.query_id if isinstance(message, CountReply)
                   else message.experiment_id)
        audit.record(session, message.spoke_id, "message.duplicate", subject,
                     kind=message.kind, message_id=message.message_id,
                     case=getattr(message, "case_id", None))
        session.commit()
        return False
    if isinstance(message, CountReply):
        return ingest_count_reply(session, message)
    target = _target(session, message)
    spoke = _spoke(session, message.spoke_id)
    spoke.last_seen_at = utcnow()
    session.add(spoke)
    session.add(InboundMessage(message_id=message.message_id, kind=message.kind,
                               spoke_id=message.spoke_id))
    applied = True
    if isinstance(message, ExperimentStatusMessage):
        _apply_status(session, target, message)
    elif isinstance(message, CaseStartedMessage):
        _apply_started(session, message)
    else:
        applied = _apply_result(session, message)
    quarantined = (not applied and isinstance(message, ResultMessage) and session.exec(
        select(QuarantinedMessage).where(
            QuarantinedMessage.broker_message_id == message.message_id)).first() is not None)
    if isinstance(message, ResultMessage | ExperimentStatusMessage):
        gaps.settle_targets(session, message.spoke_id)
    audit.record(session, message.spoke_id, "message.received", message.experiment_id,
                 kind=message.kind, message_id=message.message_id,
                 case=getattr(message, "case_id", None),
                 attempt=getattr(message, "attempt", None),
                 duplicate=not applied and not quarantined, quarantined=quarantined,
                 state=getattr(message, "state", None), reason=getattr(message, "reason", None),
                 failure=message.failure.reason.value
                 if isinstance(message, ResultMessage) and message.failure else None)
    if applied and isinstance(message, ResultMessage):
        debounce.mark_stale(session, message.experiment_id)  # recomputed off this thread
    completed = _maybe_complete(session, message.experiment_id)
    session.commit()
    if completed:
        tasks.aggregate_experiment(message.experiment_id)  # the final aggregate, at once
    return applied


# -- ephemeral reports ------------------------------------------------------------------------
def _apply_heartbeat(session: Session, message: HeartbeatMessage) -> bool:
    """What the spoke says about itself; an older heartbeat never overwrites a newer one."""
    spoke = _spoke(session, message.spoke_id)
    if spoke.last_heartbeat_at is not None and _aware(spoke.last_heartbeat_at) > message.sent_at:
        return False
    spoke.last_seen_at = utcnow()
    spoke.last_heartbeat_at = message.sent_at
    spoke.heartbeat_interval_s = message.interval_seconds
    spoke.spoke_version = message.spoke_version
    spoke.concurrency = message.concurrency
    spoke.queue_depth = message.queue_depth
    spoke.outbox_depth = message.outbox_depth
    spoke.running = [r.model_dump(mode="json") for r in message.running]
    anchors.note_spoke_head(session, spoke, message.audit_head)
    if message.trust is not None:
        if (spoke.trusted_publishers != list(message.trust.keyids)
                or spoke.trust_required != message.trust.required):
            audit.record(session, message.spoke_id, "spoke.trust_reported", message.spoke_id,
                         required=message.trust.required, keyids=list(message.trust.keyids),
                         sandbox=message.trust.sandbox)
        spoke.trust_reported_at = message.sent_at
        spoke.trust_required = message.trust.required
        spoke.trusted_publishers = list(message.trust.keyids)
        spoke.trust_sandbox = message.trust.sandbox
    if message.certificate is not None:
        spoke.certificate_serial = message.certificate.serial
        spoke.certificate_not_after = message.certificate.not_after
    session.add(spoke)
    session.commit()
    return True


def _apply_progress(session: Session, message: CaseProgressMessage) -> bool:
    """The latest progress of a running attempt; ignored once the attempt has a result.
    Every progress message is audited, applied or not: it is a channel out of a spoke."""
    _target(session, message)
    row = _case(session, message.experiment_id, message.spoke_id, message.case_id)
    stale = (row.progress_at is not None and _aware(row.progress_at) > message.sent_at)
    applied = not (row.attempt != message.attempt or row.state in FINAL_CASE_STATES or stale)
    audit.record(session, message.spoke_id, "progress.received", message.experiment_id,
                 message_id=message.message_id, case=message.case_id,
                 attempt=message.attempt, fraction=message.fraction,
                 step=message.message, applied=applied)
    if applied:
        row.state = CaseState.RUNNING
        row.progress_fraction = message.fraction
        row.progress_message = message.message
        row.progress_at = message.sent_at
        session.add(row)
        spoke = _spoke(session, message.spoke_id)
        spoke.last_seen_at = utcnow()
        session.add(spoke)
    session.commit()
    return applied


def _aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; they were stored in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- durable messages -------------------------------------------------------------------------
def _apply_status(session: Session, target: ExperimentTarget,
                  message: ExperimentStatusMessage) -> None:
    state = message.state
    if state == SpokeExperimentState.ACCEPTED:
        if target.state in (TargetState.PENDING, TargetState.PUBLISHED, TargetState.HELD):
            target.state = TargetState.ACCEPTED
        target.reason = message.reason
        target.case_count = len(message.case_ids)
        for case_id in message.case_ids:
            session.add(_case(session, message.experiment_id, message.spoke_id, case_id))
    elif state == SpokeExperimentState.REFUSED:
        target.state = TargetState.REFUSED
        target.reason = message.reason
    elif state == SpokeExperimentState.HELD:
        if target.state not in TERMINAL_TARGET_STATES | {TargetState.CANCELLING}:
            target.state = TargetState.HELD
            target.reason = message.reason
        if message.case_ids:
            target.case_count = len(message.case_ids)
    elif state == SpokeExperimentState.CANCELLED:
        target.state = TargetState.CANCELLED
        target.reason = message.reason
        for case_id in message.case_ids:
            row = _case(session, message.experiment_id, message.spoke_id, case_id)
            if row.state not in FINAL_CASE_STATES:
                row.state = CaseState.CANCELLED
                row.note = f"cancelled: {message.reason or 'on request'}"
                session.add(row)
    elif state == SpokeExperimentState.RETRY_REFUSED:
        _restore_refused_retries(session, target, message)
    else:
        if target.state == TargetState.HELD:
            target.reason = message.reason  # the steward's review is over
        target.spoke_completed_at = utcnow()
        # Completed only once every case has its result here (gaps.settle_targets).
        target.state = (TargetState.COMPLETED if target.state in TERMINAL_TARGET_STATES
                        | {TargetState.CANCELLING} else TargetState.ACCEPTED)
    target.updated_at = utcnow()
    session.add(target)


def _restore_refused_retries(session: Session, target: ExperimentTarget,
                             message: ExperimentStatusMessage) -> None:
    """The spoke will not re-run these cases: they keep their latest accepted attempt."""
    for case_id in message.case_ids:
        row = _case(session, message.experiment_id, message.spoke_id, case_id)
        latest = session.exec(select(CaseAttempt).where(
            CaseAttempt.experiment_id == message.experiment_id,
            CaseAttempt.spoke_id == message.spoke_id, CaseAttempt.case_id == case_id)
            .order_by(CaseAttempt.attempt.desc())).first()  # type: ignore[attr-defined]
        if latest is None or row.state in FINAL_CASE_STATES:
            continue
        row.state, row.attempt, row.failure = latest.state, latest.attempt, latest.failure
        row.note = f"retry refused by the spoke: {message.reason or 'no reason given'}"
        session.add(row)
    session.flush()
    open_cases = session.exec(select(CaseResult).where(
        CaseResult.experiment_id == message.experiment_id,
        CaseResult.spoke_id == message.spoke_id,
        CaseResult.state.in_([CaseState.QUEUED, CaseState.RUNNING]))).first()  # type: ignore[attr-defined]
    if open_cases is None and target.state == TargetState.ACCEPTED:
        target.state = TargetState.COMPLETED


def _apply_started(session: Session, message: CaseStartedMessage) -> None:
    row = _case(session, message.experiment_id, message.spoke_id, message.case_id)
    if row.id is None:
        return  # not a case the spoke accepted: a start report does not make it one
    if row.state in FINAL_CASE_STATES and row.attempt >= message.attempt:
        return  # a late report about an attempt that already has its result
    row.state = CaseState.RUNNING
    row.attempt = message.attempt
    row.started_at = message.sent_at
    row.progress_fraction = row.progress_message = row.progress_at = None
    session.add(row)


def _verify_custody(session: Session, message: ResultMessage) -> tuple[SpokeChain, str]:
    """Signature, subject digest and chain continuity of the result's custody record."""
    if message.custody is None:
        raise Rejected("result carries no custody record")
    try:
        record = verify_custody(message.custody, active_keys(session, message.spoke_id), message)
    except SignatureError as exc:
        raise Rejected(f"custody record refused: {exc}") from None
    digest = record_hash(message.custody)
    if session.exec(select(CaseResult).where(CaseResult.custody_sha256 == digest)).first():
        raise Rejected("replayed custody record: already accepted under another message")
    # Locked until commit (PostgreSQL; SQLite locks the whole file): two consumers never
    # advance one spoke's chain from the same head.
    chain = session.get(SpokeChain, message.spoke_id, with_for_update=True)
    expected = (chain.sequence + 1, chain.record_sha256) if chain else (1, GENESIS)
    if record.sequence > expected[0]:
        raise gaps.GapDetected(message.spoke_id, expected[0], record.sequence - 1)
    if expected[1] == gaps.ACCEPTED_GAP_HEAD:  # an administrator accepted the records lost
        expected = (expected[0], record.previous_record_sha256)
    if (record.sequence, record.previous_record_sha256) != expected:
        raise Rejected(f"custody chain broken: record {record.sequence} follows "
                       f"{record.previous_record_sha256[:12]}…, expected record {expected[0]} "
                       f"after {expected[1][:12]}…")
    chain = chain or SpokeChain(spoke_id=message.spoke_id, sequence=0, record_sha256=GENESIS)
    chain.sequence, chain.record_sha256 = record.sequence, digest
    return chain, digest


def _case_state(message: ResultMessage) -> CaseState:
    if message.failure is not None and message.failure.reason == FailureReason.CANCELLED:
        return CaseState.CANCELLED
    return CaseState(message.status.value)


def _apply_result(session: Session, message: ResultMessage) -> bool:
    """Store one attempt's result. The first result for (experiment, spoke, case, attempt)
    wins; another one for the same attempt (a case run twice across a crash, say) is
    verified, extends the custody chain, and is otherwise ignored."""
    row = _case(session, message.experiment_id, message.spoke_id, message.case_id)
    earlier = session.exec(select(CaseAttempt).where(
        CaseAttempt.experiment_id == message.experiment_id,
        CaseAttempt.spoke_id == message.spoke_id, CaseAttempt.case_id == message.case_id,
        CaseAttempt.attempt == message.attempt)).first()
    if earlier is not None and message.custody is not None \
            and earlier.custody_sha256 == record_hash(message.custody):
        raise Rejected(f"case {message.case_id} already has a result for attempt "
                       f"{message.attempt}: replayed or conflicting result")
    chain, digest = _verify_custody(session, message)
    session.add(chain)
    gaps.chain_advanced(session, message.spoke_id, chain.sequence)
    if earlier is not None:
        return False
    refusal = _unacceptable(session, message, row)
    if refusal is not None:
        _quarantine(session, message, refusal)
        return False
    state = _case_state(message)
    session.add(CaseAttempt(
        experiment_id=message.experiment_id, spoke_id=message.spoke_id,
        case_id=message.case_id, attempt=message.attempt, state=state,
        failure=message.failure.model_dump(mode="json") if message.failure else None,
        result_message_id=message.message_id, custody_sha256=digest,
        started_at=message.started_at, finished_at=message.finished_at))
    if row.state in FINAL_CASE_STATES and row.attempt > message.attempt:
        return True  # history only: a later attempt is already the case's result
    row.custody = message.custody
    row.custody_sha256 = digest
    row.state = state
    row.attempt = message.attempt
    row.output = message.output
    row.failure = message.failure.model_dump(mode="json") if message.failure else None
    row.released = message.released
    row.image_digest = message.image_digest
    row.started_at = message.started_at
    row.finished_at = message.finished_at
    row.result_message_id = message.message_id
    row.received_at = utcnow()
    row.note = None
    session.add(row)
    return True


def _unacceptable(session: Session, message: ResultMessage, row: CaseResult) -> str | None:
    """Why a result whose custody verifies must still not count, or None. Which cases a
    spoke runs comes only from what it said itself (its signed accepted status)."""
    target = session.get(ExperimentTarget, (message.experiment_id, message.spoke_id))
    if target is not None and target.state == TargetState.REFUSED:
        return (f"result for case {message.case_id} of an experiment the spoke refused "
                f"({target.reason or 'no reason given'})")
    if row.id is None:
        return f"result for case {message.case_id}, which the spoke never accepted"
    experiment = session.get(Experiment, message.experiment_id)
    algorithm = session.get(Algorithm, experiment.algorithm_id) if experiment else None
    approved = algorithm.digest if algorithm else None
    if message.image_digest is not None and message.image_digest != approved:
        return (f"custody record names image {message.image_digest}, not the approved "
                f"version {approved}")
    if message.status == CaseStatus.SUCCEEDED:
        if message.image_digest is None:
            return "a succeeded result whose custody record names no image"
        if message.output is None:
            return f"a succeeded result for case {message.case_id} with no output"
    return None


def _quarantine(session: Session, message: ResultMessage, reason: str) -> None:
    """Keep a refused result aside with its reason. Its custody record was genuine, so the
    chain still advances: the spoke's later results are not refused for a gap."""
    log.warning("quarantining result %s from %s: %s", message.message_id, message.spoke_id,
                reason)
    session.add(QuarantinedMessage(broker_message_id=message.message_id,
                                   claimed_spoke=message.spoke_id, reason=reason,
                                   body=message.model_dump_json()[:256 * 1024]))
    audit.record(session, "hub", "result.quarantined", message.experiment_id,
                 spoke=message.spoke_id, case=message.case_id, attempt=message.attempt,
                 message_id=message.message_id, reason=reason)


def complete_if_settled(session: Session, experiment_id: str) -> None:
    """Complete the experiment if every target is (after a gap was accepted, say)."""
    _maybe_complete(session, experiment_id)


def _maybe_complete(session: Session, experiment_id: str) -> bool:
    """Complete the experiment if every target is settled; whether it completed now."""
    session.flush()
    experiment = session.get(Experiment, experiment_id)
    if experiment is None or experiment.state in (ExperimentState.COMPLETED,
                                                  ExperimentState.CANCELLED):
        return False
    targets = session.exec(
        select(ExperimentTarget).where(ExperimentTarget.experiment_id == experiment_id)).all()
    if targets and all(t.state in TERMINAL_TARGET_STATES for t in targets):
        experiment.state = ExperimentState.COMPLETED
        experiment.completed_at = utcnow()
        session.add(experiment)
        audit.record(session, "hub", "experiment.completed", experiment_id)
        return True
    return False
