"""Ingesting what spokes send to the results queue. Every change is idempotent: a message
id seen before is ignored, and a case that already has a result for an attempt keeps it, so
redeliveries and duplicates never count twice. Heartbeats and progress reports are
ephemeral (sent non-persistent): they update liveness and progress, newest wins.

The results consumer applies messages in batches, one transaction each
(:func:`ingest_batch`): the rows a batch needs are read with a few queries for all its
messages, each spoke's chain head is locked once, targets are settled and studies marked
stale once per batch, and the audit lines are written with one fsync. The cost per result
does not depend on the size of the study. A message the hub refuses is refused before it
changes anything, so it never takes the rest of its batch down."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from sqlalchemy import CTE, Select, String, and_, column, func, insert, inspect, text, update
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col, select

from tributary.hub import tasks
from tributary.hub.models import (
    FINAL_CASE_STATES,
    TERMINAL_TARGET_STATES,
    Algorithm,
    CaseAttempt,
    CaseResult,
    CaseState,
    CustodyGap,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    GapState,
    InboundMessage,
    QuarantinedMessage,
    Spoke,
    SpokeChain,
    SpokeKey,
    TargetState,
    utcnow,
)
from tributary.hub.opening import VerifiedCustody
from tributary.hub.services import anchors, audit, debounce, gaps, partials
from tributary.hub.services.catalog import ingest_description
from tributary.hub.services.counts import ingest_count_reply
from tributary.hub.services.enrolment import public_key
from tributary.hub.services.psi import ingest_relay, ingest_status
from tributary.protocol.cohorts.catalog import CatalogDescriptionMessage
from tributary.protocol.cohorts.psi import PsiRelay, PsiStatus
from tributary.protocol.custody import GENESIS, CustodyRecord, record_hash, verify_custody
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
from tributary.protocol.signing import PublicKey, SignatureError

log = logging.getLogger(__name__)

SpokeMessage = (ExperimentStatusMessage | CaseStartedMessage | ResultMessage | CountReply
                | CaseProgressMessage | HeartbeatMessage | CatalogDescriptionMessage | PsiRelay
                | PsiStatus)
ExperimentMessage = ExperimentStatusMessage | CaseStartedMessage | ResultMessage


class Rejected(ProtocolError):
    """A well-formed message the hub will not accept (unknown spoke or experiment)."""


#: What one batch returns for each of its messages: whether it was applied (False: a
#: duplicate, a stale report, a quarantined result), or why it was refused.
Outcome = bool | ProtocolError


def ingest(session: Session, message: SpokeMessage) -> bool:
    """Apply one message in a transaction of its own; False if it was a duplicate (or a
    stale ephemeral report); raises :class:`ProtocolError` if the hub refuses it."""
    outcome = ingest_batch(session, [message])[0]
    if isinstance(outcome, ProtocolError):
        raise outcome
    return outcome


def ingest_batch(session: Session, messages: Sequence[SpokeMessage],
                 custody: Sequence[VerifiedCustody | None] | None = None) -> list[Outcome]:
    """Apply ``messages`` in order in ONE transaction, committed here, and return each one's
    outcome. A refused message (a :class:`ProtocolError` in its place: forged, replayed, a
    custody gap...) changed nothing, and the others are applied as if it had not been
    there; a later message of the same spoke sees the chain as the earlier ones left it.
    Any other exception rolls the whole batch back and propagates: the caller may then
    apply the messages one by one to find the one at fault.

    ``custody``, in step with ``messages``, holds what :mod:`tributary.hub.opening` found
    of each result's custody record; one whose keys are no longer all the spoke's active
    keys (or None) is checked again here."""
    batch = _Batch(session, messages)
    outcomes: list[Outcome] = []
    checked = custody if custody is not None else [None] * len(messages)
    with audit.batched(session):
        try:
            for message, verified in zip(messages, checked, strict=True):
                try:
                    outcomes.append(batch.apply(message, verified))
                except ProtocolError as exc:
                    outcomes.append(exc)
            batch.finish()
            session.commit()
        except BaseException:
            session.rollback()
            raise
    for experiment_id in batch.completed:
        tasks.aggregate_experiment(experiment_id)  # the final aggregate, at once
    return outcomes


#: Most keys in one IN (...) list (SQLite allows a few thousand parameters a statement).
_CHUNK = 500


@functools.lru_cache(maxsize=64)
def _key_rows(count: int) -> CTE:
    """A table of ``count`` constant rows (experiment, spoke, case), bound at execution
    (:func:`_key_params`), for a keyed table's unique index to be joined against: one
    index probe a key. Three IN lists instead make SQLite probe their product (10,000
    probes for 100 results from 100 spokes, 2.4 ms against 0.13), and a row-value IN makes
    it scan the table. Columns ``column1`` to ``column3``, as SQLite and PostgreSQL name a
    VALUES list's. One statement per size, so SQLAlchemy compiles it once."""
    rows = ", ".join(f"(:e{i}, :s{i}, :c{i})" for i in range(count))
    return text(f"VALUES {rows}").columns(
        column("column1", String), column("column2", String), column("column3", String)
    ).cte("wanted_keys")


def _key_params(keys: Sequence[tuple[str, str, str]]) -> dict[str, str]:
    params: dict[str, str] = {}
    for i, (experiment_id, spoke_id, case_id) in enumerate(keys):
        params[f"e{i}"], params[f"s{i}"], params[f"c{i}"] = experiment_id, spoke_id, case_id
    return params


@functools.lru_cache(maxsize=64)
def _cases_by_key(count: int) -> Select[tuple[CaseResult]]:
    wanted = _key_rows(count)
    return select(CaseResult).join(wanted, and_(
        col(CaseResult.experiment_id) == wanted.c.column1,
        col(CaseResult.spoke_id) == wanted.c.column2,
        col(CaseResult.case_id) == wanted.c.column3))


@functools.lru_cache(maxsize=64)
def _attempts_by_key(count: int) -> Select[tuple[str, str, str, int, str]]:
    wanted = _key_rows(count)
    return select(CaseAttempt.experiment_id, CaseAttempt.spoke_id, CaseAttempt.case_id,
                  CaseAttempt.attempt, CaseAttempt.custody_sha256).join(wanted, and_(
        col(CaseAttempt.experiment_id) == wanted.c.column1,
        col(CaseAttempt.spoke_id) == wanted.c.column2,
        col(CaseAttempt.case_id) == wanted.c.column3))


class _Applied(Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class _Checked:
    """A result whose custody record verified and continues its spoke's chain."""

    row: CaseResult
    earlier: CaseAttempt | None
    record: CustodyRecord
    digest: str


def _case_key(message: SpokeMessage) -> tuple[str, str, str] | None:
    case_id = getattr(message, "case_id", None)
    experiment_id = getattr(message, "experiment_id", None)
    if case_id is None or experiment_id is None:
        return None
    return experiment_id, message.spoke_id, case_id


class _Batch:
    """The rows a batch of messages needs, each read once, and what the batch touched
    (spokes to settle, studies to mark stale and to check for completion)."""

    def __init__(self, session: Session, messages: Sequence[SpokeMessage]) -> None:
        self.session = session
        self.settle: set[str] = set()
        # Written together (write_pending): message ids, attempts, spokes' last contact.
        self.inbound: list[dict[str, object]] = []
        self.new_attempts: list[dict[str, object]] = []
        self.case_updates: dict[int, dict[str, object]] = {}  # by row id: a result's columns
        self.seen: set[str] = set()
        self.stale: set[str] = set()
        self.experiments: set[str] = set()
        self.completed: list[str] = []
        self.partials = partials.PartialUpdates(session)
        durable = [m for m in messages
                   if not isinstance(m, HeartbeatMessage | CaseProgressMessage)]
        ids = {m.message_id for m in durable}
        self.known: set[str] = set(session.exec(select(InboundMessage.message_id).where(
            col(InboundMessage.message_id).in_(ids)))) if ids else set()
        # What every message is checked against, read once: registered spokes, targets.
        spoke_ids = {m.spoke_id for m in messages}
        self.spokes: set[str] = set(session.exec(select(Spoke.id).where(
            col(Spoke.id).in_(spoke_ids))))
        experiment_ids = {m.experiment_id for m in messages
                          if getattr(m, "experiment_id", None) is not None}
        self.targets: dict[tuple[str, str], TargetState] = {}
        self._pinned: list[object] = []
        if experiment_ids:
            self.targets = {(e, s): TargetState(state) for e, s, state in session.exec(
                select(ExperimentTarget.experiment_id, ExperimentTarget.spoke_id,
                       ExperimentTarget.state).where(
                    col(ExperimentTarget.experiment_id).in_(experiment_ids),
                    col(ExperimentTarget.spoke_id).in_(spoke_ids)))}
            # Into the session's identity map, where ``session.get`` finds them without a
            # query as long as something holds them (the map holds unchanged rows weakly).
            experiments = session.exec(select(Experiment).where(
                col(Experiment.id).in_(experiment_ids))).all()
            self._pinned += experiments
            self._pinned += session.exec(select(Algorithm).where(
                col(Algorithm.id).in_({e.algorithm_id for e in experiments}))).all()
        self.cases: dict[tuple[str, str, str], CaseResult] = {}
        self._absent: set[tuple[str, str, str]] = set()  # looked up, no row (yet)
        self._load_cases({k for m in messages if (k := _case_key(m)) is not None})
        results = [m for m in messages if isinstance(m, ResultMessage)]
        self.digests = {m.message_id: record_hash(m.custody) for m in results
                        if m.custody is not None}
        # The custody digest of each attempt stored, by (experiment, spoke, case, attempt).
        self.attempts: dict[tuple[str, str, str, int], str] = {}
        self.taken: set[str] = set()
        self.chains: dict[str, SpokeChain] = {}
        self.keys: dict[str, list[PublicKey]] = {}
        self.gapped: set[str] = set()
        if results:
            self._load_results(results)

    def _load_cases(self, keys: set[tuple[str, str, str]]) -> None:
        wanted = sorted(keys - self.cases.keys() - self._absent)
        for start in range(0, len(wanted), _CHUNK):  # a status may list thousands of cases
            chunk = wanted[start:start + _CHUNK]
            for row in self.session.exec(_cases_by_key(len(chunk)),  # type: ignore[call-overload]
                                         params=_key_params(chunk)):
                self.cases[(row.experiment_id, row.spoke_id, row.case_id)] = row
        self._absent.update(key for key in wanted if key not in self.cases)

    def load_cases(self, experiment_id: str, spoke_id: str, case_ids: Iterable[str]) -> None:
        """Read the rows of these cases of one spoke together (a status lists them all)."""
        self._load_cases({(experiment_id, spoke_id, case_id) for case_id in case_ids})

    def _load_results(self, results: list[ResultMessage]) -> None:
        session = self.session
        keys = sorted({(m.experiment_id, m.spoke_id, m.case_id) for m in results})
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start:start + _CHUNK]
            for experiment_id, spoke_id, case_id, attempt, digest in session.exec(
                    _attempts_by_key(len(chunk)),  # type: ignore[call-overload]
                    params=_key_params(chunk)):
                self.attempts[(experiment_id, spoke_id, case_id, attempt)] = digest
        if self.digests:
            self.taken = set(session.exec(select(CaseResult.custody_sha256).where(
                col(CaseResult.custody_sha256).in_(set(self.digests.values())))))
        spokes = sorted({m.spoke_id for m in results})
        # Locked until commit (PostgreSQL; SQLite locks the whole file), in one order, so
        # two consumers never advance one spoke's chain from the same head nor deadlock.
        for chain in session.exec(select(SpokeChain).where(col(SpokeChain.spoke_id).in_(spokes))
                                  .order_by(col(SpokeChain.spoke_id)).with_for_update()):
            self.chains[chain.spoke_id] = chain
        for key in session.exec(select(SpokeKey).where(
                col(SpokeKey.spoke_id).in_(spokes), col(SpokeKey.revoked_at).is_(None))):
            self.keys.setdefault(key.spoke_id, []).append(public_key(key.public_key_pem))
        self.gapped = set(session.exec(select(CustodyGap.spoke_id).where(
            col(CustodyGap.spoke_id).in_(spokes), CustodyGap.state == GapState.OPEN.value)))

    def case(self, experiment_id: str, spoke_id: str, case_id: str) -> CaseResult:
        """The case's row; a new (unsaved) one if the spoke never accepted the case."""
        key = (experiment_id, spoke_id, case_id)
        if key not in self.cases and key not in self._absent:
            self._load_cases({key})
        if key not in self.cases:
            self.cases[key] = CaseResult(experiment_id=experiment_id, spoke_id=spoke_id,
                                         case_id=case_id)
        return self.cases[key]

    def case_to_change(self, experiment_id: str, spoke_id: str, case_id: str) -> CaseResult:
        """The case's row, for a change through the ORM: a result stored earlier in the
        batch is written first, so that the two changes reach the database in order."""
        row = self.case(experiment_id, spoke_id, case_id)
        if row.id is not None and row.id in self.case_updates:
            self.write_case_updates()
        return row

    def update_case(self, row: CaseResult, values: dict[str, object]) -> None:
        """Give a stored case a result's columns. The row in the session takes the values
        as already committed (no ORM change tracking: most of a result's cost was the unit
        of work's), and the batch writes them with one UPDATE by primary key for all its
        results (:meth:`write_case_updates`). A row changed through the ORM earlier in the
        batch (a start report) stays on the ORM's path, so its changes keep their order."""
        if inspect(row).modified:
            for name, value in values.items():
                setattr(row, name, value)
            self.session.add(row)
            return
        for name, value in values.items():
            set_committed_value(row, name, value)
        assert row.id is not None
        self.case_updates[row.id] = {"id": row.id, **values}

    def write_case_updates(self) -> None:
        if self.case_updates:
            updates, self.case_updates = list(self.case_updates.values()), {}
            self.session.execute(update(CaseResult), updates)

    # -- one message ----------------------------------------------------------------------
    def apply(self, message: SpokeMessage, verified: VerifiedCustody | None = None) -> bool:
        """Apply one message; raises :class:`ProtocolError` before changing anything."""
        session = self.session
        if isinstance(message, HeartbeatMessage):
            return _apply_heartbeat(session, message)
        if isinstance(message, CaseProgressMessage):
            return _apply_progress(self, message)
        if message.message_id in self.known:
            subject = (message.query_id if isinstance(message, CountReply)
                       else message.spoke_id if isinstance(message, CatalogDescriptionMessage)
                       else message.psi_id if isinstance(message, PsiRelay | PsiStatus)
                       else message.experiment_id)
            audit.record(session, message.spoke_id, "message.duplicate", subject,
                         kind=message.kind, message_id=message.message_id,
                         case=getattr(message, "case_id", None))
            return False
        if isinstance(message, CountReply):
            applied = ingest_count_reply(session, message, commit=False)
            self.known.add(message.message_id)
            return applied
        if isinstance(message, CatalogDescriptionMessage):
            applied = ingest_description(session, message)
            self.known.add(message.message_id)
            return applied
        if isinstance(message, PsiRelay | PsiStatus):
            applied = (ingest_relay if isinstance(message, PsiRelay) else ingest_status)(
                session, message)  # type: ignore[arg-type]
            self.known.add(message.message_id)
            return applied
        if message.spoke_id not in self.spokes:
            raise Rejected(f"message from unregistered spoke {message.spoke_id!r}")
        if (message.experiment_id, message.spoke_id) not in self.targets:
            raise Rejected(f"experiment {message.experiment_id!r} does not target spoke "
                           f"{message.spoke_id!r}")
        checked = (self.check_result(message, verified) if isinstance(message, ResultMessage)
                   else None)
        # Nothing was changed before this point: a refusal above leaves the batch as it was.
        self.known.add(message.message_id)
        self.seen.add(message.spoke_id)
        self.inbound.append({"message_id": message.message_id, "kind": message.kind,
                             "spoke_id": message.spoke_id, "received_at": utcnow()})
        outcome = _Applied.APPLIED
        if isinstance(message, ExperimentStatusMessage):
            self.write_pending()  # what a status reads (attempts, chains) is in the database
            target = _target(session, message)
            _apply_status(self, target, message)
            gaps.settle_targets(session, message.spoke_id)
            self.targets[(message.experiment_id, message.spoke_id)] = target.state
        elif isinstance(message, CaseStartedMessage):
            _apply_started(self, message)
        else:
            assert checked is not None
            outcome = self.apply_result(message, checked)
            self.settle.add(message.spoke_id)  # once per batch, in finish()
        audit.record(session, message.spoke_id, "message.received", message.experiment_id,
                     kind=message.kind, message_id=message.message_id,
                     case=getattr(message, "case_id", None),
                     attempt=getattr(message, "attempt", None),
                     duplicate=outcome == _Applied.DUPLICATE,
                     quarantined=outcome == _Applied.QUARANTINED,
                     state=getattr(message, "state", None),
                     reason=getattr(message, "reason", None),
                     failure=message.failure.reason.value
                     if isinstance(message, ResultMessage) and message.failure else None)
        if outcome == _Applied.APPLIED and isinstance(message, ResultMessage):
            self.stale.add(message.experiment_id)  # recomputed off this thread
        self.experiments.add(message.experiment_id)
        return outcome != _Applied.DUPLICATE and outcome != _Applied.QUARANTINED

    def check_result(self, message: ResultMessage, verified: VerifiedCustody | None = None
                     ) -> _Checked:
        """Everything that can refuse a result, without changing anything. A custody
        record checked on another core (``verified``) is taken if every key it was checked
        against is still one of the spoke's active keys; otherwise it is checked here."""
        row = self.case(message.experiment_id, message.spoke_id, message.case_id)
        digest = self.digests.get(message.message_id)
        earlier = self.attempts.get((message.experiment_id, message.spoke_id, message.case_id,
                                     message.attempt))
        if earlier is not None and digest is not None and earlier == digest:
            raise Rejected(f"case {message.case_id} already has a result for attempt "
                           f"{message.attempt}: replayed or conflicting result")
        if message.custody is None or digest is None:
            raise Rejected("result carries no custody record")
        keys = self.keys.get(message.spoke_id, [])
        if verified is not None and verified.keyids <= {key.keyid for key in keys}:
            record = verified.record
        else:
            try:
                record = verify_custody(message.custody, keys, message)
            except SignatureError as exc:
                raise Rejected(f"custody record refused: {exc}") from None
        if digest in self.taken:
            raise Rejected("replayed custody record: already accepted under another message")
        chain = self.chains.get(message.spoke_id)
        expected = (chain.sequence + 1, chain.record_sha256) if chain else (1, GENESIS)
        if record.sequence > expected[0]:
            raise gaps.GapDetected(message.spoke_id, expected[0], record.sequence - 1)
        if expected[1] == gaps.ACCEPTED_GAP_HEAD:  # an administrator accepted the records lost
            expected = (expected[0], record.previous_record_sha256)
        if (record.sequence, record.previous_record_sha256) != expected:
            raise Rejected(f"custody chain broken: record {record.sequence} follows "
                           f"{record.previous_record_sha256[:12]}…, expected record "
                           f"{expected[0]} after {expected[1][:12]}…")
        return _Checked(row, earlier, record, digest)

    def apply_result(self, message: ResultMessage, checked: _Checked) -> _Applied:
        """Store one attempt's result. The first result for (experiment, spoke, case,
        attempt) wins; another one for the same attempt (a case run twice across a crash,
        say) extends the custody chain and is otherwise ignored."""
        session, row, digest = self.session, checked.row, checked.digest
        chain = self.chains.get(message.spoke_id) or SpokeChain(
            spoke_id=message.spoke_id, sequence=0, record_sha256=GENESIS)
        chain.sequence, chain.record_sha256 = checked.record.sequence, digest
        self.chains[message.spoke_id] = chain
        session.add(chain)
        if message.spoke_id in self.gapped:
            gaps.chain_advanced(session, message.spoke_id, chain.sequence)
        if checked.earlier is not None:
            return _Applied.DUPLICATE
        refusal = _unacceptable(session, message, row,
                                self.targets[(message.experiment_id, message.spoke_id)])
        if refusal is not None:
            _quarantine(session, message, refusal)
            return _Applied.QUARANTINED
        state = _case_state(message)
        self.new_attempts.append({
            "experiment_id": message.experiment_id, "spoke_id": message.spoke_id,
            "case_id": message.case_id, "attempt": message.attempt, "state": state,
            "failure": message.failure.model_dump(mode="json") if message.failure else None,
            "result_message_id": message.message_id, "custody_sha256": digest,
            "started_at": message.started_at, "finished_at": message.finished_at,
            "received_at": utcnow()})
        self.attempts[(message.experiment_id, message.spoke_id, message.case_id,
                       message.attempt)] = digest
        if row.state in FINAL_CASE_STATES and row.attempt > message.attempt:
            return _Applied.APPLIED  # history only: a later attempt is already the result
        if row.custody_sha256 is not None:
            self.taken.discard(row.custody_sha256)
        self.taken.add(digest)
        old = partials.view(row)
        self.update_case(row, {
            "custody": message.custody, "custody_sha256": digest, "state": state,
            "attempt": message.attempt, "output": message.output,
            "failure": message.failure.model_dump(mode="json") if message.failure else None,
            "released": message.released, "image_digest": message.image_digest,
            "started_at": message.started_at, "finished_at": message.finished_at,
            "result_message_id": message.message_id, "received_at": utcnow(), "note": None})
        experiment = session.get(Experiment, message.experiment_id)
        if experiment is not None:
            self.partials.replace(experiment, old, partials.view(row))
        return _Applied.APPLIED

    def write_pending(self) -> None:
        """Write what the batch keeps as plain rows (a statement each, not an object per
        row): message ids, attempts, and when the spokes were last heard from."""
        session = self.session
        self.write_case_updates()
        if self.inbound:
            session.execute(insert(InboundMessage), self.inbound)
            self.inbound = []
        if self.new_attempts:
            session.execute(insert(CaseAttempt), self.new_attempts)
            self.new_attempts = []
        if self.seen:
            session.execute(update(Spoke).where(col(Spoke.id).in_(self.seen))
                            .values(last_seen_at=utcnow())
                            .execution_options(synchronize_session=False))
            self.seen = set()
        self.partials.write()

    def finish(self) -> None:
        """What the batch does once for all its messages: settle the targets of spokes that
        sent results, mark studies stale, complete studies whose targets all settled."""
        self.write_pending()
        gaps.settle_targets(self.session, self.settle)
        for experiment_id in sorted(self.stale):
            debounce.mark_stale(self.session, experiment_id)
        for experiment_id in sorted(self.experiments):
            if _maybe_complete(self.session, experiment_id):
                self.completed.append(experiment_id)


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
    if message.capacity is not None:
        capacity = message.capacity.model_dump(mode="json")
        if spoke.capacity != capacity:
            audit.record(session, message.spoke_id, "spoke.capacity_reported",
                         message.spoke_id, **capacity)
            spoke.capacity = capacity
    if message.certificate is not None:
        spoke.certificate_serial = message.certificate.serial
        spoke.certificate_not_after = message.certificate.not_after
    session.add(spoke)
    return True


def _apply_progress(batch: _Batch, message: CaseProgressMessage) -> bool:
    """The latest progress of a running attempt; ignored once the attempt has a result.
    Every progress message is audited, applied or not: it is a channel out of a spoke."""
    session = batch.session
    _target(session, message)
    row = batch.case_to_change(message.experiment_id, message.spoke_id, message.case_id)
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
    return applied


def _aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; they were stored in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- durable messages -------------------------------------------------------------------------
def _apply_status(batch: _Batch, target: ExperimentTarget,
                  message: ExperimentStatusMessage) -> None:
    session = batch.session
    state = message.state
    if target.withdrawn_at is not None:  # the hub took it out: its word changes nothing
        audit.record(session, "hub", "message.after_withdrawal", message.experiment_id,
                     spoke=message.spoke_id, kind=message.kind, state=state.value,
                     message_id=message.message_id)
        if state != SpokeExperimentState.CANCELLED:
            return
    batch.load_cases(message.experiment_id, message.spoke_id, message.case_ids)
    if state == SpokeExperimentState.ACCEPTED:
        if target.state in (TargetState.PENDING, TargetState.PUBLISHED, TargetState.HELD):
            target.state = TargetState.ACCEPTED
        target.reason = message.reason
        target.case_count = len(message.case_ids)
        for case_id in message.case_ids:
            session.add(batch.case(message.experiment_id, message.spoke_id, case_id))
        session.flush()  # the cases are accepted from now on (they have an id)
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
        target.reason = target.reason if target.withdrawn_at else message.reason
        for case_id in message.case_ids:
            row = batch.case_to_change(message.experiment_id, message.spoke_id, case_id)
            if row.state not in FINAL_CASE_STATES:
                row.state = CaseState.CANCELLED
                row.note = f"cancelled: {message.reason or 'on request'}"
                session.add(row)
    elif state == SpokeExperimentState.RETRY_REFUSED:
        _restore_refused_retries(batch, target, message)
    else:
        if target.state == TargetState.HELD:
            target.reason = message.reason  # the steward's review is over
        target.spoke_completed_at = utcnow()
        # Completed only once every case has its result here (gaps.settle_targets).
        target.state = (TargetState.COMPLETED if target.state in TERMINAL_TARGET_STATES
                        | {TargetState.CANCELLING} else TargetState.ACCEPTED)
    target.updated_at = utcnow()
    session.add(target)


def _restore_refused_retries(batch: _Batch, target: ExperimentTarget,
                             message: ExperimentStatusMessage) -> None:
    """The spoke will not re-run these cases: they keep their latest accepted attempt."""
    session = batch.session
    for case_id in message.case_ids:
        row = batch.case_to_change(message.experiment_id, message.spoke_id, case_id)
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


def _withdrawn(session: Session, experiment_id: str, spoke_id: str
               ) -> ExperimentTarget | None:
    """The spoke's target if the hub withdrew it from the experiment (its membership
    lapsed, :mod:`tributary.hub.services.lapse`), else None."""
    target = session.get(ExperimentTarget, (experiment_id, spoke_id))
    return target if target is not None and target.withdrawn_at is not None else None


def _apply_started(batch: _Batch, message: CaseStartedMessage) -> None:
    session = batch.session
    row = batch.case_to_change(message.experiment_id, message.spoke_id, message.case_id)
    if row.id is None:
        return  # not a case the spoke accepted: a start report does not make it one
    if batch.targets.get((message.experiment_id, message.spoke_id)) == TargetState.CANCELLED \
            and _withdrawn(session, message.experiment_id, message.spoke_id):
        return  # withdrawn: nothing of it runs for the study any more
    if row.state in FINAL_CASE_STATES and row.attempt >= message.attempt:
        return  # a late report about an attempt that already has its result
    row.state = CaseState.RUNNING
    row.attempt = message.attempt
    row.started_at = message.sent_at
    row.progress_fraction = row.progress_message = row.progress_at = None
    session.add(row)


def _case_state(message: ResultMessage) -> CaseState:
    if message.failure is not None and message.failure.reason == FailureReason.CANCELLED:
        return CaseState.CANCELLED
    return CaseState(message.status.value)


def _unacceptable(session: Session, message: ResultMessage, row: CaseResult,
                  target_state: TargetState) -> str | None:
    """Why a result whose custody verifies must still not count, or None. Which cases a
    spoke runs comes only from what it said itself (its signed accepted status)."""
    if target_state == TargetState.REFUSED:
        target = session.get(ExperimentTarget, (message.experiment_id, message.spoke_id))
        return (f"result for case {message.case_id} of an experiment the spoke refused "
                f"({target.reason if target and target.reason else 'no reason given'})")
    if target_state == TargetState.CANCELLED:
        withdrawn = _withdrawn(session, message.experiment_id, message.spoke_id)
        if withdrawn is not None:  # whatever it claims
            assert withdrawn.withdrawn_at is not None
            return (f"result for case {message.case_id} arrived after the spoke was "
                    f"withdrawn from the study at {_aware(withdrawn.withdrawn_at).isoformat()}"
                    f" ({withdrawn.reason})")
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
    """Complete the experiment if every target is settled; whether it completed now.
    Counts targets by state rather than reading them (a study may target 200 spokes)."""
    session.flush()
    experiment = session.get(Experiment, experiment_id)
    if experiment is None or experiment.state in (ExperimentState.COMPLETED,
                                                  ExperimentState.CANCELLED):
        return False
    states = dict(session.exec(select(ExperimentTarget.state, func.count())
                               .where(ExperimentTarget.experiment_id == experiment_id)
                               .group_by(col(ExperimentTarget.state))).all())
    if states and all(TargetState(state) in TERMINAL_TARGET_STATES for state in states):
        experiment.state = ExperimentState.COMPLETED
        experiment.completed_at = utcnow()
        session.add(experiment)
        audit.record(session, "hub", "experiment.completed", experiment_id)
        return True
    return False
