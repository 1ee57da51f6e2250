"""The spoke agent: the queue consumer, and the threads it starts. Four kinds of thread
share one durable journal:

- the *consumer* (:meth:`SpokeAgent.run`) verifies each message from the hub, journals it
  and acknowledges it at once, so no broker message stays unacknowledged while cases run
  for hours, and cancellations are obeyed while work is under way;
- the *dispatcher* admits journaled experiments (:mod:`tributary.spoke.admission`: image
  checks, an incremental ingest of the sources, the cohort from the catalog) and hands
  queued cases to ``concurrency`` case workers, each case exactly once
  (:mod:`tributary.spoke.execution`); a container mounts only the de-identified store;
- the *counter* answers journaled count requests (see :mod:`tributary.spoke.counts`),
  so an ingest a count needs first delays no other message, and takes the relayed steps of
  private set intersections the steward approved (:mod:`tributary.spoke.psi_party`);
- the *outbox sender* publishes results and statuses in journal order, whenever the
  broker is there (see :mod:`tributary.spoke.outbox`), and the heartbeat reports liveness;
- when the site's ``[training]`` enables it, the *training participant* takes part in
  training studies from its own queue (:mod:`tributary.spoke.training_agent`), with the
  spoke's key, its pinned hub key and its image checks (:mod:`tributary.spoke.training_exec`).

Every change of an experiment's state, every audit entry and every wake-up goes through
one :class:`~tributary.spoke.lifecycle.Lifecycle`, which the other parts receive.

When the site's ``[steward]`` policy asks for it, experiments wait (journaled as ``held``)
for the data steward's approval and results wait for review before they enter the custody
chain; the consumer applies the steward's decisions whenever it is idle (see
:mod:`tributary.spoke.steward`).

After a crash, :meth:`SpokeAgent.recover` removes the containers the dead process left
and puts interrupted cases back in the queue; finished cases are never run again.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

from tributary.protocol.auditlog import AuditLog
from tributary.protocol.broker import Delivery, StompClient
from tributary.protocol.cohorts.psi import PsiForward, PsiRequest
from tributary.protocol.destinations import results_group, results_queue, spoke_queue
from tributary.protocol.messages import (
    ApprovalRevokedMessage,
    CancelExperimentMessage,
    CountRequest,
    HeartbeatMessage,
    ProtocolError,
    ResendRecordsMessage,
    RetryCasesMessage,
)
from tributary.protocol.objects import ObjectStore
from tributary.protocol.signing import PublicKey, SigningKey, sha256_hex
from tributary.protocol.wire import HubMessage, open_from_hub
from tributary.spoke import __version__
from tributary.spoke import journal as states
from tributary.spoke.admission import Admission
from tributary.spoke.case_ids import ReleasedCaseIds
from tributary.spoke.cases import Cases
from tributary.spoke.catalog_publisher import CatalogPublisher
from tributary.spoke.config import SpokeConfig
from tributary.spoke.control import HubControl
from tributary.spoke.counts import CountResponder
from tributary.spoke.custody import CustodyChain
from tributary.spoke.execution import CaseExecution, progress_audit
from tributary.spoke.images import RegistryAccess
from tributary.spoke.ingest import store_root
from tributary.spoke.journal import Journal, OutboxRow, claim_work_dir
from tributary.spoke.lifecycle import Lifecycle
from tributary.spoke.liveness import (
    Heartbeat,
    ProgressReporter,
    RunningCases,
    certificate_status,
)
from tributary.spoke.outbox import OutboxSender
from tributary.spoke.psi_party import PsiParty
from tributary.spoke.runner import site_capacity
from tributary.spoke.steward import Steward, StewardDesk
from tributary.spoke.store import check_format
from tributary.spoke.training_agent import TrainingAgent, load_or_create_secret
from tributary.spoke.training_exec import SpokeTrainer
from tributary.spoke.trust import TrustedKeys
from tributary.spoke.vertical import VerticalAgent
from tributary.spoke.vertical_columns import site_attributes

log = logging.getLogger(__name__)
#: Attempts at handling a hub message before a fault that is not the message's (a bug, a
#: journal that cannot be written) sends it to the dead-letter queue with the fault.
HANDLE_ATTEMPTS = 3


class SpokeAgent:
    """One spoke process: it wires the parts together around one :class:`Lifecycle`,
    consumes the hub's queue and runs the threads."""

    def __init__(self, config: SpokeConfig) -> None:
        self.config = config
        # Refused before anything starts: cases would mount series folders whose objects
        # the catalog no longer names (StoreFormatError names the migrate command).
        check_format(store_root(config.work_dir))
        self._work_dir_lock = claim_work_dir(config.work_dir)
        self.journal = Journal(config.work_dir / "journal.db")
        self.key = SigningKey.load_or_create(config.work_dir / "spoke.key")
        self.hub_keys = [PublicKey.load(config.hub_public_key)]
        self.client = StompClient(config.broker.settings(), f"spoke-{config.spoke_id}")
        results = results_queue(config.broker.federation)
        self.outbox = OutboxSender(self.journal, self.client, results, self._sent,
                                   group=results_group(config.spoke_id))
        desk = StewardDesk(config.work_dir / "journal.db")
        self.lifecycle = Lifecycle(config.spoke_id, self.journal,
                                   AuditLog(config.work_dir / "audit.jsonl"), self.key, desk,
                                   self.outbox.wake)
        chain = CustodyChain(self.journal, self.key)
        self.steward = Steward(config, self.lifecycle, desk, chain, self.hub_keys)
        self.stopping = threading.Event()
        self.counts = CountResponder(config, self.lifecycle, self.stopping)
        self.publisher = CatalogPublisher(config, self.lifecycle, self.key, self.stopping)
        self.psi = PsiParty(config, self.journal, self.key, self.lifecycle.outgoing,
                            self.lifecycle.audit, self.outbox.wake)
        cases = Cases(config, self.lifecycle, ReleasedCaseIds.from_key_file(
            config.work_dir / "case-id.key", config.spoke_id))
        self.trusted = TrustedKeys(config.work_dir,
                                   [PublicKey.load(p) for p in config.trust.publisher_keys],
                                   sandbox=config.trust.sandbox)
        self.admission = Admission(config, self.lifecycle, cases, self.hub_keys, self.trusted,
                                   self.stopping,
                                   RegistryAccess(config.spoke_id, self.key,
                                                  config.registry.token_service,
                                                  config.registry.ca_file))
        self.running = RunningCases(config.concurrency)
        progress = ProgressReporter(self.client, results, self.key, config.spoke_id,
                                    config.liveness.progress_seconds,
                                    audit=progress_audit(self.lifecycle),
                                    enabled=not config.steward.review_results)
        self.execution = CaseExecution(config, self.lifecycle, cases, self.steward, chain,
                                       self.running, progress, self.stopping)
        self.control = HubControl(config, self.lifecycle, self.steward, self.running)
        self.heartbeat = Heartbeat(self.client, results, self.key,
                                   config.liveness.heartbeat_seconds, self._heartbeat,
                                   watch=self.trusted.stamp)
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self._count_wake = threading.Event()
        self._pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="case")
        self._desk = desk
        self.training = self._training_agent() if config.training.enabled else None
        self.vertical = self._vertical_agent() if config.training.enabled \
            and config.training.vertical_attributes else None

    def _training_agent(self) -> TrainingAgent:
        """The training participant, under this spoke's identity and trust chain."""
        settings = self.config.training
        assert settings.objectstore_credentials is not None
        trainer = SpokeTrainer(self.config, self.hub_keys, self.trusted.current,
                               self.admission.registry, self.lifecycle.audit,
                               self.journal.revocation)
        work = self.config.work_dir
        return TrainingAgent(
            self.config.spoke_id, self.client,
            ObjectStore.from_file(settings.objectstore_credentials), self.key,
            self.hub_keys[0], trainer, self.config.broker.federation,
            work / "training.journal", load_or_create_secret(work / "training-journal.key"),
            default_cap=settings.max_epsilon_per_study or float("inf"),
            audit=self.lifecycle.audit, version=__version__, release_loss=settings.release_loss)

    def _vertical_agent(self) -> VerticalAgent:
        """The vertical-training party: its columns from the site's attributes file
        (:mod:`tributary.spoke.vertical_columns`), its studies held for the steward
        (``tributary spoke vertical``)."""
        settings, work = self.config.training, self.config.work_dir
        assert settings.objectstore_credentials is not None

        return VerticalAgent(
            self.config.spoke_id, self.client,
            ObjectStore.from_file(settings.objectstore_credentials), self.key,
            self.hub_keys[0], self.config.broker.federation, work,
            load_or_create_secret(work / "vertical-journal.key"),
            settings.vertical_attributes, lambda: site_attributes(self.config),
            audit=self.lifecycle.audit)

    # -- the process --------------------------------------------------------------------------
    def run(self) -> None:
        """Consume until :meth:`stop` is called; reconnects to the broker by itself."""
        self.recover()
        self.client.start()
        self.outbox.start()
        dispatcher = threading.Thread(target=self._dispatch_loop, name="dispatcher",
                                      daemon=True)
        dispatcher.start()
        counter = threading.Thread(target=self._count_loop, name="counter", daemon=True)
        counter.start()
        inbox = spoke_queue(self.config.spoke_id, self.config.broker.federation)
        self.client.subscribe(inbox, self._inbox.put)
        if self.training is not None:
            self.training.start()
        if self.vertical is not None:
            self.vertical.start()
        log.info("spoke %s (tributary %s) waiting for experiments", self.config.spoke_id,
                 __version__)
        self.lifecycle.audit("spoke.started", self.config.spoke_id, version=__version__)
        # After spoke.started, so even the first heartbeat anchors a non-empty log.
        self.heartbeat.start()
        self.publisher.start()  # the site's description: now, then when it changes
        try:
            while not self.stopping.is_set():
                try:
                    delivery = self._inbox.get(timeout=0.5)
                except queue.Empty:
                    self._apply_steward_decisions()
                    continue
                self.handle(delivery)
        finally:
            self.stopping.set()
            self.lifecycle.wake()
            self._count_wake.set()
            dispatcher.join(timeout=30)
            counter.join(timeout=30)
            self.publisher.join(timeout=30)
            self.running.cancel_all()  # stop containers; their cases run again next start
            self._pool.shutdown(wait=True)
            if self.training is not None:
                self.training.stop()
            if self.vertical is not None:
                self.vertical.stop()
            self.heartbeat.stop()
            self.outbox.stop(drain_seconds=5)
            self.client.close()
            self._desk.close()
            self.journal.close()
            self.lifecycle.audit("spoke.stopped", self.config.spoke_id)

    def _apply_steward_decisions(self) -> None:
        """Between messages: act on what the site's data steward decided meanwhile."""
        try:
            self.steward.apply_decisions()
            if self.psi.apply_decisions():
                self._count_wake.set()  # an approved PSI may have relayed messages waiting
        except Exception:
            log.exception("could not apply the steward's decisions; will retry")

    def stop(self) -> None:
        self.stopping.set()

    def recover(self) -> None:
        """Pick up after a crash: containers a dead spoke process left behind are removed
        (labelled with this spoke's id), cases that were running go back to the queue,
        and results an older spoke left unsent join the outbox."""
        for row in self.journal.requeue_interrupted():
            log.warning("case %s of %s (attempt %d) was interrupted; it will run again",
                        row.case_id, row.experiment_id, row.attempt)
            self.lifecycle.audit("case.interrupted", row.experiment_id, case=row.case_id,
                                          attempt=row.attempt, launches=row.launches)
        self.execution.remove_orphans()
        for result in self.journal.legacy_unpublished():
            self.journal.mark_legacy_queued(result, self.lifecycle.outgoing(result))

    # -- messages from the hub ----------------------------------------------------------------
    def handle(self, delivery: Delivery) -> None:
        """Handle one message from the hub's queue, whatever its bytes: it ends journaled
        and acknowledged, dropped as a replay, or dead-lettered with an audited reason. A
        fault while handling it is retried a few times, then dead-lettered too: an exception
        here would stop the consumer, and meet the same message at every restart. Only a
        failure to audit (see :meth:`Lifecycle.audit`) still stops the spoke."""
        for attempt in range(1, HANDLE_ATTEMPTS + 1):
            try:
                self._handle(delivery)
                return
            except Exception as exc:
                log.exception("could not handle message %s (attempt %d of %d)",
                              delivery.message_id, attempt, HANDLE_ATTEMPTS)
                if attempt == HANDLE_ATTEMPTS:
                    self._dead_letter(delivery, None, (
                        f"the spoke could not handle it in {HANDLE_ATTEMPTS} attempts: "
                        f"{type(exc).__name__}: {exc}")[:2000])
                    return
            if self.stopping.wait(0.5 * attempt):
                return  # not acknowledged: the broker delivers it again at the next start

    def _handle(self, delivery: Delivery) -> None:
        """Verify, journal, then acknowledge one message from the hub's queue."""
        try:
            message = open_from_hub(delivery.body, self.hub_keys)
        except ProtocolError as exc:
            self._dead_letter(delivery, None, f"unreadable: {exc}")
            return
        self._received(delivery, message)
        if message.spoke_id != self.config.spoke_id:
            self._dead_letter(delivery, message, f"addressed to spoke {message.spoke_id}")
            return
        if isinstance(message, ApprovalRevokedMessage):
            self.control.revoke(message)
        elif isinstance(message, CountRequest):
            self.counts.take(message)
            self._count_wake.set()
        elif isinstance(message, PsiRequest):
            self.psi.take_request(message)
        elif isinstance(message, PsiForward):
            self.psi.take_forward(message)
            self._count_wake.set()
        elif isinstance(message, CancelExperimentMessage):
            self.control.cancel(message)
        elif isinstance(message, RetryCasesMessage):
            self.control.retry(message)
        elif isinstance(message, ResendRecordsMessage):
            self.control.resend(message)
        else:
            self.control.experiment(message, delivery.body, delivery.message_id)
        # Everything the message asks for is journaled now: nothing is lost by acking.
        self.outbox.wake()
        self.lifecycle.wake()
        if not self.client.ack(delivery):
            log.info("connection changed before the ack of %s; its redelivery will be "
                     "recognised from the journal", delivery.message_id)

    def _dead_letter(self, delivery: Delivery, message: HubMessage | None, reason: str) -> None:
        """A message that can never be processed: audit why, then NACK it, which moves it
        to the queue's dead-letter queue (``DLQ.<queue>``) at once."""
        log.error("dead-lettering message %s: %s", delivery.message_id, reason)
        if message is None:
            self._received(delivery, None)
        self.lifecycle.audit("message.dead_lettered", _subject(message),
                             message_id=delivery.message_id, reason=reason)
        self.client.nack(delivery)

    def _received(self, delivery: Delivery, message: HubMessage | None) -> None:
        self.lifecycle.audit(
            "message.received", _subject(message), actor="hub" if message else "unknown",
            message_id=delivery.message_id,
            kind=message.kind if message else delivery.headers.get("tributary-kind"),
            hub_message_id=message.message_id if message else None,
            redelivered=delivery.redelivered, size=len(delivery.body),
            sha256=sha256_hex(delivery.body))

    # -- messages to the hub ------------------------------------------------------------------
    def _sent(self, row: OutboxRow) -> None:
        """The broker confirmed an outbox message: record it."""
        self.lifecycle.audit(
            "result.published" if row.kind == "result" else "message.sent",
            row.summary.get("experiment_id") or row.summary.get("query_id")
            or row.summary.get("psi_id", ""),
            kind=row.kind, message_id=row.message_id, case=row.summary.get("case_id"),
            attempt=row.summary.get("attempt"),
            status=row.summary.get("status") or row.summary.get("state"),
            reason=row.summary.get("reason"))

    def _heartbeat(self) -> HeartbeatMessage:
        return HeartbeatMessage(
            spoke_id=self.config.spoke_id, spoke_version=__version__,
            concurrency=self.config.concurrency, queue_depth=self.journal.queue_depth(),
            running=[a.as_running() for a in self.running.now()],
            outbox_depth=self.journal.outbox_depth(),
            interval_seconds=self.config.liveness.heartbeat_seconds,
            audit_head=self.lifecycle.audit_head(),
            trust=self.trusted.report(),
            capacity=site_capacity(self.config.runner, self.config.execution.engine),
            certificate=certificate_status(self.config.broker.cert_file))

    # -- the worker threads -------------------------------------------------------------------
    def _count_loop(self) -> None:
        """Answer journaled count requests (also those a restart left unanswered) on their
        own thread: the incremental ingest an answer may need holds up no other message."""
        while not self.stopping.is_set():
            try:
                if self.counts.answer_waiting():
                    self.publisher.wake()  # answering may have ingested new cases
                self.psi.work()  # private set intersections' relayed steps, likewise
            except Exception:
                log.exception("count answering error; retrying")
                self.stopping.wait(5)
            self._count_wake.wait(5.0)
            self._count_wake.clear()

    def _dispatch_loop(self) -> None:
        while not self.stopping.is_set():
            self.lifecycle.wait_for_work(1.0)
            try:
                for message in self.journal.experiments_in(states.RECEIVED):
                    if self.stopping.is_set():
                        return
                    self.admission.prepare(message)
                    self.publisher.wake()  # admitting may have ingested new cases
                while not self.stopping.is_set():
                    claimed = self.running.claim(self.journal.claim_next)
                    if claimed is None:
                        break
                    row, activity = claimed
                    known = self.journal.experiment(row.experiment_id)
                    assert known is not None, "a case without its experiment"
                    self._pool.submit(self.execution.run, known[0], row, activity)
            except Exception:
                log.exception("dispatcher error; retrying")
                self.stopping.wait(5)


def _subject(message: HubMessage | None) -> str:
    """What a hub message is about, for the audit log: its experiment or count query."""
    return (getattr(message, "experiment_id", None) or getattr(message, "query_id", None)
            or getattr(message, "psi_id", None) or "")
