"""Ingesting what spokes send to the results queue. Every change is idempotent: a message
id seen before is ignored, and a case that already has a final result for an attempt keeps
it, so redeliveries and duplicates never count twice."""

from __future__ import annotations

import logging

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from tributary.hub import worker
from tributary.hub.models import (
    FINAL_CASE_STATES,
    TERMINAL_TARGET_STATES,
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
from tributary.hub.services import audit
from tributary.hub.services.enrolment import active_keys, resolve_key
from tributary.protocol.broker import Delivery, StompClient
from tributary.protocol.custody import GENESIS, record_hash, verify_custody
from tributary.protocol.destinations import results_queue
from tributary.protocol.messages import (
    CaseStartedMessage,
    ExperimentStatusMessage,
    ProtocolError,
    ResultMessage,
)
from tributary.protocol.messages import (
    ExperimentState as SpokeExperimentState,
)
from tributary.protocol.signing import SignatureError
from tributary.protocol.wire import open_from_spoke

log = logging.getLogger(__name__)

SpokeMessage = ExperimentStatusMessage | CaseStartedMessage | ResultMessage


class Rejected(ProtocolError):
    """A well-formed message the hub will not accept (unknown spoke or experiment)."""


def _case(session: Session, experiment_id: str, spoke_id: str, case_id: str) -> CaseResult:
    row = session.exec(select(CaseResult).where(
        CaseResult.experiment_id == experiment_id, CaseResult.spoke_id == spoke_id,
        CaseResult.case_id == case_id)).first()
    if row is None:
        row = CaseResult(experiment_id=experiment_id, spoke_id=spoke_id, case_id=case_id)
    return row


def _target(session: Session, message: SpokeMessage) -> ExperimentTarget:
    if session.get(Spoke, message.spoke_id) is None:
        raise Rejected(f"message from unregistered spoke {message.spoke_id!r}")
    target = session.get(ExperimentTarget, (message.experiment_id, message.spoke_id))
    if target is None:
        raise Rejected(f"experiment {message.experiment_id!r} does not target spoke "
                       f"{message.spoke_id!r}")
    return target


def ingest(session: Session, message: SpokeMessage) -> bool:
    """Apply one message; False if it was a duplicate."""
    if session.get(InboundMessage, message.message_id) is not None:
        return False
    target = _target(session, message)
    spoke = session.get(Spoke, message.spoke_id)
    assert spoke is not None
    spoke.last_seen_at = utcnow()
    session.add(spoke)
    session.add(InboundMessage(message_id=message.message_id, kind=message.kind,
                               spoke_id=message.spoke_id))
    applied = True
    if isinstance(message, ExperimentStatusMessage):
        _apply_status(session, target, message)
    elif isinstance(message, CaseStartedMessage):
        row = _case(session, message.experiment_id, message.spoke_id, message.case_id)
        if row.state not in FINAL_CASE_STATES:
            row.state = CaseState.RUNNING
            row.started_at = message.sent_at
            session.add(row)
    else:
        applied = _apply_result(session, message)
    audit.record(session, message.spoke_id, "message.received", message.experiment_id,
                 kind=message.kind, message_id=message.message_id,
                 case=getattr(message, "case_id", None), duplicate=not applied)
    _maybe_complete(session, message.experiment_id)
    session.commit()
    if applied and isinstance(message, ResultMessage):
        worker.enqueue(message.experiment_id)  # re-aggregate (hub/worker.py)
    return applied


def _apply_status(session: Session, target: ExperimentTarget,
                  message: ExperimentStatusMessage) -> None:
    if message.state == SpokeExperimentState.ACCEPTED:
        if target.state in (TargetState.PENDING, TargetState.PUBLISHED):
            target.state = TargetState.ACCEPTED
        target.case_count = len(message.case_ids)
        for case_id in message.case_ids:
            row = _case(session, message.experiment_id, message.spoke_id, case_id)
            session.add(row)
    elif message.state == SpokeExperimentState.REFUSED:
        target.state = TargetState.REFUSED
        target.reason = message.reason
    else:
        target.state = TargetState.COMPLETED
    target.updated_at = utcnow()
    session.add(target)


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
    chain = session.get(SpokeChain, message.spoke_id)
    expected = (chain.sequence + 1, chain.record_sha256) if chain else (1, GENESIS)
    if (record.sequence, record.previous_record_sha256) != expected:
        raise Rejected(f"custody chain broken: record {record.sequence} follows "
                       f"{record.previous_record_sha256[:12]}…, expected record {expected[0]} "
                       f"after {expected[1][:12]}…")
    chain = chain or SpokeChain(spoke_id=message.spoke_id, sequence=0, record_sha256=GENESIS)
    chain.sequence, chain.record_sha256 = record.sequence, digest
    return chain, digest


def _apply_result(session: Session, message: ResultMessage) -> bool:
    row = _case(session, message.experiment_id, message.spoke_id, message.case_id)
    if row.state in FINAL_CASE_STATES and row.attempt >= message.attempt:
        raise Rejected(f"case {message.case_id} already has a result for attempt "
                       f"{row.attempt}: replayed or conflicting result")
    chain, digest = _verify_custody(session, message)
    session.add(chain)
    row.custody = message.custody
    row.custody_sha256 = digest
    row.state = CaseState(message.status.value)
    row.attempt = message.attempt
    row.output = message.output
    row.failure = message.failure.model_dump(mode="json") if message.failure else None
    row.released = message.released
    row.image_digest = message.image_digest
    row.started_at = message.started_at
    row.finished_at = message.finished_at
    row.result_message_id = message.message_id
    row.received_at = utcnow()
    session.add(row)
    return True


def _maybe_complete(session: Session, experiment_id: str) -> None:
    session.flush()
    experiment = session.get(Experiment, experiment_id)
    if experiment is None or experiment.state == ExperimentState.COMPLETED:
        return
    targets = session.exec(
        select(ExperimentTarget).where(ExperimentTarget.experiment_id == experiment_id)).all()
    if targets and all(t.state in TERMINAL_TARGET_STATES for t in targets):
        experiment.state = ExperimentState.COMPLETED
        experiment.completed_at = utcnow()
        session.add(experiment)
        audit.record(session, "hub", "experiment.completed", experiment_id)


class ResultsConsumer:
    """Consumes the results queue; acknowledges a message only once it is stored."""

    def __init__(self, engine: Engine, client: StompClient) -> None:
        self.engine = engine
        self.client = client
        self.queue = results_queue(client.settings.federation)

    def start(self) -> None:
        self.client.subscribe(self.queue, self.handle)

    def _resolve(self, keyid: str):  # type: ignore[no-untyped-def]
        with Session(self.engine) as session:
            return resolve_key(session, keyid)

    def handle(self, delivery: Delivery) -> None:
        claimed: str | None = None
        try:
            message, _keyid = open_from_spoke(delivery.body, self._resolve)
            claimed = message.spoke_id
            with Session(self.engine) as session:
                ingest(session, message)
        except ProtocolError as exc:
            self._dead_letter(delivery, str(exc), claimed)
            return
        except Exception as exc:
            log.exception("could not store message %s", delivery.message_id)
            self._dead_letter(delivery, f"hub could not store the message: {exc}", claimed)
            return
        self.client.ack(delivery)

    def _dead_letter(self, delivery: Delivery, reason: str, claimed: str | None) -> None:
        """Keep the refused message aside with its reason, audit it, and move it to the
        results queue's dead-letter queue."""
        log.warning("refusing message %s: %s", delivery.message_id, reason)
        with Session(self.engine) as session:
            session.add(QuarantinedMessage(
                broker_message_id=delivery.message_id, claimed_spoke=claimed, reason=reason,
                body=delivery.body[:256 * 1024].decode("utf-8", errors="replace")))
            audit.record(session, "hub", "message.rejected", self.queue,
                         broker_message_id=delivery.message_id, reason=reason,
                         spoke=claimed, size=len(delivery.body))
            session.commit()
        self.client.nack(delivery)
