"""The spoke agent. Four kinds of thread share one durable journal:

- the *consumer* (:meth:`SpokeAgent.run`) verifies each message from the hub, journals it
  and acknowledges it at once, so no broker message stays unacknowledged while cases run
  for hours, and cancellations are obeyed while work is under way;
- the *dispatcher* prepares journaled experiments (image checks, an incremental ingest of
  the sources, the cohort from the catalog) and hands queued cases to ``concurrency``
  case workers, each case exactly once; a container mounts only the de-identified store;
- the *counter* answers journaled count requests (see :mod:`tributary.spoke.counts`),
  so an ingest a count needs first delays no other message;
- the *outbox sender* publishes results and statuses in journal order, whenever the
  broker is there (see :mod:`tributary.spoke.outbox`), and the heartbeat reports liveness.

When the site's ``[steward]`` policy asks for it, experiments wait (journaled as ``held``)
for the data steward's approval and results wait for review before they enter the custody
chain; the consumer applies the steward's decisions whenever it is idle (see
:mod:`tributary.spoke.steward`).

After a crash, :meth:`SpokeAgent.recover` removes the containers the dead process left
and puts interrupted cases back in the queue; finished cases are never run again.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import docker
import docker.errors

from tributary.protocol.auditlog import AuditHead, AuditLog, AuditLogError
from tributary.protocol.broker import Delivery, StompClient
from tributary.protocol.contract import Participant, Progress
from tributary.protocol.destinations import results_queue, spoke_queue
from tributary.protocol.messages import (
    MAX_MESSAGE_BYTES,
    ApprovalRevokedMessage,
    CancelExperimentMessage,
    CaseProgressMessage,
    CaseStartedMessage,
    CaseStatus,
    CountRequest,
    ExperimentMessage,
    ExperimentState,
    ExperimentStatusMessage,
    Failure,
    FailureReason,
    HeartbeatMessage,
    ProtocolError,
    ResendRecordsMessage,
    ResultMessage,
    RetryCasesMessage,
)
from tributary.protocol.signing import PublicKey, SigningKey, sha256_hex
from tributary.protocol.wire import HubMessage, open_from_hub, seal
from tributary.spoke import __version__, counts
from tributary.spoke import journal as states
from tributary.spoke.case_ids import ReleasedCaseIds
from tributary.spoke.catalog import (
    CatalogCase,
    SelectionRefused,
    refused_attributes,
    released_attributes,
)
from tributary.spoke.config import SpokeConfig
from tributary.spoke.custody import CustodyChain, input_digest, outgoing
from tributary.spoke.deid import profile_name
from tributary.spoke.images import ImageRefused, check_approval, check_release, ensure_image
from tributary.spoke.ingest import open_catalog, refresh_catalog, series_folders
from tributary.spoke.journal import CaseRow, Journal, OutboxRow, claim_work_dir
from tributary.spoke.liveness import CaseActivity, Heartbeat, ProgressReporter
from tributary.spoke.outbox import OutboxSender
from tributary.spoke.participant import build_participant
from tributary.spoke.runner import SPOKE_LABEL, effective_limits, remove_orphans, run_case
from tributary.spoke.steward import Steward

log = logging.getLogger(__name__)
#: Room left in a result message for its custody record (signed, base64 inside DSSE).
CUSTODY_ALLOWANCE_BYTES = 16 * 1024
#: Attempts at handling a hub message before a fault that is not the message's (a bug, a
#: journal that cannot be written) sends it to the dead-letter queue with the fault.
HANDLE_ATTEMPTS = 3


def _now() -> datetime:
    return datetime.now(UTC)


class SpokeAgent:
    def __init__(self, config: SpokeConfig) -> None:
        self.config = config
        self._work_dir_lock = claim_work_dir(config.work_dir)
        self.journal = Journal(config.work_dir / "journal.db")
        self.audit = AuditLog(config.work_dir / "audit.jsonl")
        self.key = SigningKey.load_or_create(config.work_dir / "spoke.key")
        self.hub_keys = [PublicKey.load(config.hub_public_key)]
        self.publishers = [PublicKey.load(p) for p in config.trust.publisher_keys]
        self.case_ids = ReleasedCaseIds.from_key_file(config.work_dir / "case-id.key",
                                                      config.spoke_id)
        self.chain = CustodyChain(self.journal, self.key)
        self.client = StompClient(config.broker.settings(), f"spoke-{config.spoke_id}")
        results = results_queue(config.broker.federation)
        self.outbox = OutboxSender(self.journal, self.client, results, self._sent)
        self.progress = ProgressReporter(self.client, results, self.key, config.spoke_id,
                                         config.liveness.progress_seconds,
                                         audit=self._audit_progress,
                                         enabled=not config.steward.review_results)
        self.heartbeat = Heartbeat(self.client, results, self.key,
                                   config.liveness.heartbeat_seconds, self._heartbeat)
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._count_wake = threading.Event()
        self._running: dict[tuple[str, str], CaseActivity] = {}
        self._running_lock = threading.Lock()
        self._finish_lock = threading.Lock()
        self._cohorts: dict[str, dict[str, CatalogCase]] = {}
        self._cohort_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="case")
        self.steward = Steward(self)
        #: What the configured options make; a case states the profile its store files
        #: were actually made under (the catalog's record).
        self.deid_profile = profile_name(config.deidentification)

    # -- lifecycle ------------------------------------------------------------------------
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
        log.info("spoke %s (tributary %s) waiting for experiments", self.config.spoke_id,
                 __version__)
        self._audit("spoke.started", self.config.spoke_id, version=__version__)
        # After spoke.started, so even the first heartbeat anchors a non-empty log.
        self.heartbeat.start()
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
            self._wake.set()
            self._count_wake.set()
            dispatcher.join(timeout=30)
            counter.join(timeout=30)
            with self._running_lock:  # stop containers; their cases run again next start
                for activity in self._running.values():
                    activity.cancel.set()
            self._pool.shutdown(wait=True)
            self.heartbeat.stop()
            self.outbox.stop(drain_seconds=5)
            self.client.close()
            self.steward.close()
            self.journal.close()
            self._audit("spoke.stopped", self.config.spoke_id)

    def _apply_steward_decisions(self) -> None:
        """Between messages: act on what the site's data steward decided meanwhile."""
        try:
            self.steward.apply_decisions()
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
            self._audit("case.interrupted", row.experiment_id, case=row.case_id,
                        attempt=row.attempt, launches=row.launches)
        try:
            client = docker.from_env(timeout=120)
            try:
                removed = remove_orphans(client, self.config.spoke_id,
                                         self.config.work_dir / "runs")
            finally:
                client.close()
        except docker.errors.DockerException as exc:
            log.error("could not look for orphaned containers: %s", exc)
            self._audit("container.orphan_check_failed", self.config.spoke_id, error=str(exc))
        else:
            for labels in removed:
                log.warning("removed orphaned container %s", labels.get("name"))
                self._audit("container.orphan_removed", labels.get("name", ""),
                            container_id=labels.get("id"),
                            experiment=labels.get("org.tributary.experiment"),
                            case=labels.get("org.tributary.case-id"),
                            attempt=labels.get("org.tributary.attempt"))
        for result in self.journal.legacy_unpublished():
            self.journal.mark_legacy_queued(result, outgoing(result, self.key))

    # -- messages from the hub ----------------------------------------------------------------
    def handle(self, delivery: Delivery) -> None:
        """Handle one message from the hub's queue, whatever its bytes: it ends journaled
        and acknowledged, dropped as a replay, or dead-lettered with an audited reason. A
        fault while handling it is retried a few times, then dead-lettered too: an exception
        here would stop the consumer, and meet the same message at every restart. Only a
        failure to audit (see :meth:`_audit`) still stops the spoke."""
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
            self._on_revoked(message)
        elif isinstance(message, CountRequest):
            counts.handle(self, message)
            self._count_wake.set()
        elif isinstance(message, CancelExperimentMessage):
            self._on_cancel(message)
        elif isinstance(message, RetryCasesMessage):
            self._on_retry(message)
        elif isinstance(message, ResendRecordsMessage):
            self._on_resend(message)
        else:
            self._on_experiment(delivery, message)
        # Everything the message asks for is journaled now: nothing is lost by acking.
        self.outbox.wake()
        self._wake.set()
        if not self.client.ack(delivery):
            log.info("connection changed before the ack of %s; its redelivery will be "
                     "recognised from the journal", delivery.message_id)

    def _dead_letter(self, delivery: Delivery, message: HubMessage | None, reason: str) -> None:
        """A message that can never be processed: audit why, then NACK it, which moves it
        to the queue's dead-letter queue (``DLQ.<queue>``) at once."""
        log.error("dead-lettering message %s: %s", delivery.message_id, reason)
        if message is None:
            self._received(delivery, None)
        self._audit("message.dead_lettered", _subject(message),
                    message_id=delivery.message_id, reason=reason)
        self.client.nack(delivery)

    def _on_revoked(self, message: ApprovalRevokedMessage) -> None:
        """Nothing runs with a revoked image any more: queued cases fail as not trusted
        when their turn comes, and running containers are stopped now; their cases go back
        to the queue, where the same check fails them with the revocation as reason."""
        self.journal.revoke(message.digest, message.reason)
        with self._running_lock:
            running = list(self._running.values())
        stopping = []
        for activity in running:
            known = self.journal.experiment(activity.experiment_id)
            if known is not None and known[0].algorithm.digest == message.digest:
                activity.cancel.set()
                stopping.append(f"{activity.experiment_id}/{activity.case_id}")
        log.warning("approval of %s %s (%s) revoked: %s; %d running case(s) stopped",
                    message.name, message.version, message.digest, message.reason,
                    len(stopping))
        self._audit("approval.revoked", message.digest, actor="hub",
                    algorithm=f"{message.name} {message.version}", reason=message.reason,
                    stopped=stopping)

    def _on_experiment(self, delivery: Delivery, message: ExperimentMessage) -> None:
        if (self.journal.handled(message.message_id)
                or self.journal.experiment(message.experiment_id) is not None):
            log.warning("dropping replayed experiment message %s (%s): already journaled",
                        message.message_id, message.experiment_id)
            self._audit("message.dropped", message.experiment_id,
                        message_id=delivery.message_id, reason="replay: already journaled")
            return
        cancelled = self.journal.cancellation(message.experiment_id)
        if cancelled is not None:  # the cancellation overtook it; the hub was told then
            self.journal.add_experiment(message, states.CANCELLED, cancelled)
            self._audit("experiment.dropped", message.experiment_id,
                        reason=f"cancelled before it arrived: {cancelled}")
            return
        if self.steward.hold_experiment(message, delivery.body):
            return  # journaled as held; the hub has been told it awaits the steward
        self.journal.add_experiment(message)
        self._audit("experiment.journaled", message.experiment_id,
                    hub_message_id=message.message_id, image=message.algorithm.reference)

    def _on_cancel(self, message: CancelExperimentMessage) -> None:
        experiment_id = message.experiment_id
        dropped = self.journal.cancel(experiment_id, message.reason, message.message_id)
        with self._running_lock:
            stopping = [a for a in self._running.values() if a.experiment_id == experiment_id]
        for activity in stopping:
            activity.cancel.set()  # the case worker kills its container within a second
        known = self.journal.experiment(experiment_id)
        state = known[1] if known else None
        self._audit("experiment.cancel", experiment_id, actor="hub", reason=message.reason,
                    state=state, dropped=dropped, stopping=[a.case_id for a in stopping])
        log.warning("experiment %s cancelled by the hub (%s): %d queued cases dropped, "
                    "%d running stopped", experiment_id, message.reason, len(dropped),
                    len(stopping))
        # Nothing of it waits for the steward any more (its held cases were dropped above).
        self.steward.discard(experiment_id, f"the hub cancelled the experiment: "
                                            f"{message.reason}")
        if state is None:  # it has not arrived: tell the hub now, refuse it when it does
            self._settle(experiment_id, states.CANCELLED, ExperimentState.CANCELLED,
                         reason=message.reason)
        elif state in (states.RECEIVED, states.HELD) and self._settle(
                experiment_id, states.CANCELLED, ExperimentState.CANCELLED,
                reason=message.reason, expect=state):
            pass
        else:  # accepted (perhaps just now): done once its running cases have stopped
            self._maybe_finish(experiment_id)

    def _on_retry(self, message: RetryCasesMessage) -> None:
        experiment_id = message.experiment_id
        if self.journal.experiment(experiment_id) is None:
            queued, refused = [], dict.fromkeys(message.case_ids,
                                                "the experiment is unknown at this spoke")
        elif (cancelled := self.journal.cancellation(experiment_id)) is not None:
            queued, refused = [], dict.fromkeys(message.case_ids,
                                                f"the experiment was cancelled: {cancelled}")
        else:
            queued, refused = self.journal.add_retry(experiment_id, message.case_ids,
                                                     message.attempt)
        self._audit("cases.retry", experiment_id, actor="hub", attempt=message.attempt,
                    queued=queued, refused=refused, reason=message.reason)
        if refused:
            reasons = sorted({f"{why}: {', '.join(c for c, w in refused.items() if w == why)}"
                              for why in refused.values()})
            self.journal.send_later(outgoing(ExperimentStatusMessage(
                experiment_id=experiment_id, spoke_id=self.config.spoke_id,
                state=ExperimentState.RETRY_REFUSED, case_ids=list(refused),
                reason="; ".join(reasons)[:2000]), self.key))

    def _on_resend(self, message: ResendRecordsMessage) -> None:
        """Results the hub never received (lost on the broker) leave again from the
        journal, unchanged; the hub ignores any it already has."""
        marked, orphans = self.journal.resend_from(message.from_sequence)
        for result in orphans:
            self.journal.send_later(outgoing(result, self.key))
        log.warning("the hub asks for custody records from %d on: %d result(s) sent again",
                    message.from_sequence, marked + len(orphans))
        self._audit("custody.resend", "", actor="hub", from_sequence=message.from_sequence,
                    results=marked + len(orphans), reason=message.reason)

    def _audit(self, action: str, target: str = "", actor: str | None = None,
               **detail: Any) -> None:
        """Append to the spoke's forensic log; it is fsynced before the spoke goes on, and
        a failure to write stops the work rather than leave it unrecorded."""
        self.audit.append(actor or self.config.spoke_id, action, target, detail)

    def _received(self, delivery: Delivery, message: HubMessage | None) -> None:
        self._audit("message.received", _subject(message),
                    actor="hub" if message else "unknown", message_id=delivery.message_id,
                    kind=message.kind if message else delivery.headers.get("tributary-kind"),
                    hub_message_id=message.message_id if message else None,
                    redelivered=delivery.redelivered, size=len(delivery.body),
                    sha256=sha256_hex(delivery.body))

    # -- messages to the hub ------------------------------------------------------------------
    def _sent(self, row: OutboxRow) -> None:
        """The broker confirmed an outbox message: record it."""
        self._audit("result.published" if row.kind == "result" else "message.sent",
                    row.summary.get("experiment_id") or row.summary.get("query_id", ""),
                    kind=row.kind,
                    message_id=row.message_id, case=row.summary.get("case_id"),
                    attempt=row.summary.get("attempt"),
                    status=row.summary.get("status") or row.summary.get("state"),
                    reason=row.summary.get("reason"))

    def _heartbeat(self) -> HeartbeatMessage:
        with self._running_lock:
            running = [a.as_running() for a in self._running.values()]
        return HeartbeatMessage(
            spoke_id=self.config.spoke_id, spoke_version=__version__,
            concurrency=self.config.concurrency, queue_depth=self.journal.queue_depth(),
            running=running, outbox_depth=self.journal.outbox_depth(),
            interval_seconds=self.config.liveness.heartbeat_seconds,
            audit_head=self._audit_head())

    def _audit_head(self) -> AuditHead | None:
        """The audit log's head for the hub to anchor; None (and logged) if unreadable, so a
        broken log never stops the heartbeats."""
        try:
            return self.audit.head()
        except (OSError, ValueError, AuditLogError) as exc:
            log.error("audit log head not sent: %s", exc)
            return None

    def _settle(self, experiment_id: str, state: str, status: ExperimentState,
                case_ids: list[str] | None = None, reason: str | None = None,
                queue: list[str] | None = None, expect: str | None = None) -> bool:
        """Move an experiment to ``state`` and, in the same transaction, queue the status
        message that tells the hub (only from state ``expect``, when given)."""
        message = ExperimentStatusMessage(
            experiment_id=experiment_id, spoke_id=self.config.spoke_id, state=status,
            case_ids=case_ids or [], reason=reason)
        settled = self.journal.settle_experiment(experiment_id, state, reason,
                                                 outgoing(message, self.key), queue or [],
                                                 expect)
        self.outbox.wake()
        return settled

    def _maybe_finish(self, experiment_id: str) -> None:
        """Send the final status once no case of the experiment is queued or running: or,
        while some results still wait for the steward's review, say so (once)."""
        with self._finish_lock:
            known = self.journal.experiment(experiment_id)
            if known is None or known[1] not in (states.ACCEPTED, states.REVIEWING):
                return
            if self.journal.unfinished(experiment_id):
                return
            cancelled = self.journal.cancellation(experiment_id)
            if cancelled is not None:
                # A result held after the cancellation was processed never leaves either.
                self.journal.cancel(experiment_id, cancelled, "")
                self.steward.discard(experiment_id,
                                     f"the hub cancelled the experiment: {cancelled}")
            rows = self.journal.cases(experiment_id)
            held = [r.case_id for r in rows if r.state == states.HELD]
            if cancelled is not None:
                dropped = sorted({r.case_id for r in rows if r.state == states.CANCELLED})
                self._settle(experiment_id, states.CANCELLED, ExperimentState.CANCELLED,
                             dropped, cancelled)
            elif held:
                if known[1] == states.ACCEPTED:
                    self._settle(experiment_id, states.REVIEWING, ExperimentState.HELD,
                                 list(dict.fromkeys(r.case_id for r in rows)),
                                 f"{len(held)} result(s) await review by the site's data "
                                 "steward", expect=states.ACCEPTED)
                    log.info("experiment %s: %d results await the steward", experiment_id,
                             len(held))
                return
            else:
                done = list(dict.fromkeys(r.case_id for r in rows))
                self._settle(experiment_id, states.COMPLETED, ExperimentState.COMPLETED, done)
                log.info("experiment %s done: %d cases", experiment_id, len(done))
            with self._cohort_lock:  # selected again should a retry come
                self._cohorts.pop(experiment_id, None)

    # -- dispatching work ---------------------------------------------------------------------
    def _count_loop(self) -> None:
        """Answer journaled count requests (also those a restart left unanswered) on their
        own thread: the incremental ingest an answer may need holds up no other message."""
        while not self.stopping.is_set():
            try:
                counts.answer_waiting(self)
            except Exception:
                log.exception("count answering error; retrying")
                self.stopping.wait(5)
            self._count_wake.wait(5.0)
            self._count_wake.clear()

    def _dispatch_loop(self) -> None:
        while not self.stopping.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                for message in self.journal.experiments_in(states.RECEIVED):
                    if self.stopping.is_set():
                        return
                    self.prepare(message)
                while not self.stopping.is_set():
                    with self._running_lock:
                        if len(self._running) >= self.config.concurrency:
                            break
                        row = self.journal.claim_next()
                        if row is None:
                            break
                        known = self.journal.experiment(row.experiment_id)
                        assert known is not None, "a case without its experiment"
                        activity = CaseActivity(row.experiment_id, row.case_id, row.attempt,
                                                _now())
                        self._running[(row.experiment_id, row.case_id)] = activity
                    self._pool.submit(self._case_job, known[0], row, activity)
            except Exception:
                log.exception("dispatcher error; retrying")
                self.stopping.wait(5)

    def prepare(self, message: ExperimentMessage) -> None:
        """Check the image and select the cases of a journaled experiment; accepted cases
        are queued in the journal together with the ``accepted`` status."""
        experiment_id = message.experiment_id
        log.info("experiment %s: %s", experiment_id, message.algorithm.reference)
        if message.expires_at is not None and message.expires_at < _now():
            self._settle(experiment_id, states.REFUSED, ExperimentState.REFUSED,
                         reason="experiment expired", expect=states.RECEIVED)
            return
        reference = message.algorithm.reference
        try:
            docker_client = docker.from_env(timeout=120)
        except docker.errors.DockerException as exc:
            log.error("docker engine unavailable for %s: %s; will retry", experiment_id, exc)
            self.stopping.wait(10)
            return
        try:
            check_approval(message.algorithm, self.hub_keys)
            revoked = self.journal.revocation(message.algorithm.digest)
            if revoked is not None:
                raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                                   f"approval revoked by the hub: {revoked}")
            check_release(message.algorithm, self.publishers,
                          self.config.runner.allowed_registries,
                          self.config.trust.registry_signatures)
            image_id = ensure_image(
                docker_client, message.algorithm, self.config.runner.allowed_registries,
                on_pull=lambda pulled: self._audit("image.pulled", reference, image_id=pulled))
            self._audit("image.verified", reference, result="verified", image_id=image_id,
                        experiment=experiment_id)
        except ImageRefused as exc:
            log.error("refusing %s: %s", experiment_id, exc.detail)
            self._audit("image.verified", reference, result="refused", reason=exc.reason,
                        error=exc.detail, experiment=experiment_id)
            self._settle(experiment_id, states.REFUSED, ExperimentState.REFUSED,
                         reason=f"{exc.reason}: {exc.detail}", expect=states.RECEIVED)
            return
        finally:
            docker_client.close()
        try:
            cases = self._select(message)
        except SelectionRefused as exc:
            log.error("refusing %s: %s", experiment_id, exc)
            self._audit("cohort.refused", experiment_id, reason=str(exc),
                        criteria=message.cohort.model_dump(mode="json"))
            self._settle(experiment_id, states.REFUSED, ExperimentState.REFUSED,
                         reason=str(exc), expect=states.RECEIVED)
            return
        except Exception as exc:
            log.exception("could not select the cases of %s", experiment_id)
            self._settle(experiment_id, states.REFUSED, ExperimentState.REFUSED,
                         reason=f"input_error: the cases could not be read: "
                                f"{type(exc).__name__}", expect=states.RECEIVED)
            return
        ids = list(cases)
        refused = refused_attributes(message.release, self.config.policy.releasable_attributes)
        if refused:
            self._audit("release.refused", experiment_id, attributes=refused,
                        reason="not releasable under this site's policy")
        if not self._settle(experiment_id, states.ACCEPTED, ExperimentState.ACCEPTED, ids,
                            reason=f"not releasable under this site's policy, never sent: "
                                   f"{', '.join(refused)}" if refused else None,
                            queue=ids, expect=states.RECEIVED):
            return  # cancelled while it was being prepared; the hub has been told
        self._maybe_finish(experiment_id)  # no cases at all: completed at once

    def _select(self, message: ExperimentMessage) -> dict[str, CatalogCase]:
        """The experiment's cohort from the catalog, after an incremental ingest of the
        sources (unless the site ingests on a schedule). Raises :class:`SelectionRefused`
        for criteria the site's release policy forbids."""
        cohort = message.cohort
        with open_catalog(self.config) as catalog:
            refresh_catalog(self.config, catalog, self._audit, message.experiment_id)
            # Ids the hub names are released ids of this study, never catalog pseudonyms.
            selected = catalog.select(cohort.model_copy(update={"case_ids": None, "max_cases":
                                                                None}))
        by_released = self._released(message.experiment_id, selected)
        if cohort.case_ids is not None:
            wanted = set(cohort.case_ids)
            by_released = {r: c for r, c in by_released.items() if r in wanted}
        if cohort.max_cases:
            by_released = dict(list(by_released.items())[:cohort.max_cases])
        self.journal.record_released(message.experiment_id,
                                     {r: c.case_id for r, c in by_released.items()})
        self._audit("cohort.selected", message.experiment_id, cases=len(by_released),
                    criteria=cohort.model_dump(mode="json"))
        with self._cohort_lock:
            cases = self._cohorts[message.experiment_id] = _as_released(by_released)
        return cases

    def _cohort(self, message: ExperimentMessage) -> dict[str, CatalogCase]:
        """The experiment's cases by id, kept per process. After a restart (or for a
        retry) they are read again from the catalog without the ``max_cases`` cut: which
        cases run was decided when the experiment was accepted and is in the journal."""
        with self._cohort_lock:
            cases = self._cohorts.get(message.experiment_id)
            if cases is None:
                with open_catalog(self.config) as catalog:
                    selected = catalog.select(message.cohort.model_copy(
                        update={"case_ids": None, "max_cases": None}))
                kept = self.journal.released_cases(message.experiment_id)
                cases = self._cohorts[message.experiment_id] = _as_released({
                    r: c for r, c in self._released(message.experiment_id, selected).items()
                    if kept.get(r) == c.case_id})
            return cases

    def _names_store_pseudonym(self, experiment_id: str, case: CatalogCase,
                               output: dict) -> bool:
        """Whether ``output`` contains the catalog's pseudonym of the case or of one of its
        series: the de-identified headers an algorithm reads carry them (PatientID is the
        case pseudonym), and an echo would link the patient across studies."""
        text = json.dumps(output).lower()
        catalog_id = self.journal.released_cases(experiment_id).get(case.case_id)
        secrets = [catalog_id] if catalog_id else []
        secrets += [s.series_id for s in case.series]
        return any(secret.lower().removeprefix("c-").removeprefix("s-") in text
                   for secret in secrets)

    def _released_series(self, experiment_id: str, participant: Participant) -> Participant:
        """The participant with study-scoped series ids instead of the store's."""
        return participant.model_copy(update={"series": [s.model_copy(update={
            "series_id": self.case_ids.released_series(experiment_id, s.series_id)})
            for s in participant.series]})

    def _released(self, experiment_id: str,
                  selected: list[CatalogCase]) -> dict[str, CatalogCase]:
        """The catalog's cases by the id released for this study, in catalog order."""
        return {self.case_ids.released(experiment_id, c.case_id): c for c in selected}

    # -- one case -----------------------------------------------------------------------------
    def _case_job(self, message: ExperimentMessage, row: CaseRow,
                  activity: CaseActivity) -> None:
        try:
            result = self._run_case(message, row, activity)
            if result is not None:
                self.outbox.wake()
        except Exception:
            log.exception("case %s of %s failed inside the spoke", row.case_id,
                          row.experiment_id)
            if not self.stopping.is_set():
                self._finish_case(message, row, activity.started_at, None, Failure(
                    reason=FailureReason.INTERNAL_ERROR,
                    detail="the spoke could not complete this case; see its log"),
                    self._empty_run())
        finally:
            with self._running_lock:
                self._running.pop((row.experiment_id, row.case_id), None)
            self._maybe_finish(row.experiment_id)
            self._wake.set()

    def _run_case(self, message: ExperimentMessage, row: CaseRow,
                  activity: CaseActivity) -> ResultMessage | None:
        """Run one claimed case and journal its signed result; None if the spoke is
        stopping (the case stays queued and runs at the next start)."""
        if self.journal.cancellation(row.experiment_id) is not None:
            self.journal.cancel(row.experiment_id, "", "")
            self.journal.drop_case(row)
            return None
        if self.steward.already_held(row.experiment_id, row.case_id, row.attempt):
            self.journal.hold_case(row)  # it ran before a restart; its result awaits review
            return None
        started = _now()
        if row.launches > self.config.liveness.max_launches:
            return self._finish_case(message, row, started, None, Failure(
                reason=FailureReason.INTERRUPTED,
                detail=f"the spoke went down {row.launches - 1} times while running this "
                       "case; it is not started again"), self._empty_run())
        revoked = self.journal.revocation(message.algorithm.digest)
        if revoked is not None:
            return self._finish_case(message, row, started, None, Failure(
                reason=FailureReason.IMAGE_NOT_TRUSTED,
                detail=f"approval revoked by the hub: {revoked}"[:2000]), self._empty_run())
        case = self._cohort(message).get(row.case_id)
        if case is None:
            return self._finish_case(message, row, started, None, Failure(
                reason=FailureReason.INPUT_ERROR,
                detail="the case is no longer in the spoke's catalog"), self._empty_run())
        self.journal.send_later(outgoing(CaseStartedMessage(
            experiment_id=row.experiment_id, spoke_id=self.config.spoke_id,
            case_id=row.case_id, attempt=row.attempt), self.key))
        self.outbox.wake()
        output, failure, run = self._execute(message, case, row.attempt, activity)
        if output is not None and self._names_store_pseudonym(row.experiment_id, case, output):
            output, failure = None, Failure(
                reason=FailureReason.INVALID_OUTPUT,
                detail="the output names the site's own case or series pseudonym (as found "
                       "in the input's headers), which never leaves the spoke")
        if (failure is not None and failure.reason == FailureReason.CANCELLED
                and self.journal.cancellation(row.experiment_id) is None):
            self.journal.release_case(row)  # stopped by a spoke shutdown, not the hub
            self._audit("case.released", row.experiment_id, case=row.case_id,
                        attempt=row.attempt, reason="spoke stopping")
            return None
        return self._finish_case(message, row, started, output, failure, run, case)

    def _finish_case(self, message: ExperimentMessage, row: CaseRow, started: datetime,
                     output: dict | None, failure: Failure | None, run: dict,
                     case: CatalogCase | None = None) -> ResultMessage | None:
        """Sign the case's result into the custody chain and queue it for the hub; or,
        when the site's steward reviews results, hold it (None) until it is released."""
        released = {}
        if failure is None and case is not None:
            released = released_attributes(case, message.release,
                                           self.config.policy.releasable_attributes)
        result = ResultMessage(
            experiment_id=message.experiment_id, spoke_id=self.config.spoke_id,
            case_id=row.case_id, attempt=row.attempt,
            status=CaseStatus.FAILED if failure else CaseStatus.SUCCEEDED,
            output=output, failure=failure, released=released,
            image_digest=message.algorithm.digest, started_at=started, finished_at=_now(),
        )
        size = len(seal(result, self.key)) + CUSTODY_ALLOWANCE_BYTES
        if size > MAX_MESSAGE_BYTES:  # it would block the outbox, and the hub refuses it
            result = result.model_copy(update={
                "status": CaseStatus.FAILED, "output": None, "released": {},
                "failure": Failure(reason=FailureReason.OUTPUT_TOO_LARGE,
                                   detail=f"the signed result would be about {size} bytes; "
                                          f"messages are limited to {MAX_MESSAGE_BYTES}")})
        if self.steward.policy.review_results:
            if self.journal.cancellation(row.experiment_id) is not None:
                # Cancelled meanwhile: nothing of it leaves unreviewed, and nothing is held.
                self.journal.drop_case(row)
                self._audit("steward.discarded", row.experiment_id, case=row.case_id,
                            attempt=row.attempt, reason="the hub cancelled the experiment")
                return None
            self.steward.hold_result(result, run)
            self.journal.hold_case(row)
            return None
        return self.chain.append(result, run)

    def _empty_run(self) -> dict:
        """The facts a custody record states about a run, before any are known."""
        return {"exit_code": None, "participant_sha256": None, "input_sha256": None,
                "deid_profile": self.deid_profile}

    def _on_progress(self, activity: CaseActivity, progress: Progress) -> None:
        self.progress.report(activity, progress)

    def _audit_progress(self, activity: CaseActivity, message: CaseProgressMessage) -> None:
        self._audit("progress.sent", activity.experiment_id, message_id=message.message_id,
                    case=activity.case_id, attempt=activity.attempt,
                    fraction=message.fraction, step=message.message,
                    report=activity.progress_reports + 1)

    def _execute(self, message: ExperimentMessage, case: CatalogCase, attempt: int,
                 activity: CaseActivity) -> tuple[dict | None, Failure | None, dict]:
        """Run the case; returns output, failure and the facts its custody record states."""
        t0 = time.monotonic()
        run = self._empty_run()
        try:
            with open_catalog(self.config) as catalog:
                run["deid_profile"] = catalog.deid_profile() or self.deid_profile
            # Only the de-identified store's series folders are ever mounted.
            deidentified = series_folders(self.config, [s.series_id for s in case.series])
            participant, mounts = build_participant(case, message.experiment_id, deidentified)
            participant = self._released_series(message.experiment_id, participant)
            run["input_sha256"] = input_digest(deidentified)
            run["participant_sha256"] = sha256_hex(
                participant.model_dump_json(indent=2).encode())
        except Exception as exc:
            log.exception("could not prepare case %s", case.case_id)
            return None, Failure(reason=FailureReason.INPUT_ERROR,
                                 detail=f"case could not be prepared: {type(exc).__name__}"), run
        client = docker.from_env(timeout=120)
        name = (f"tributary-{self.config.spoke_id}-{message.experiment_id}-{case.case_id}"
                f"-a{attempt}")
        limits = effective_limits(message.limits, self.config.runner)
        t_run = time.monotonic()
        try:
            outcome = run_case(
                client, message.algorithm.reference, name=name,
                participant=participant, mounts=mounts, arguments=message.arguments,
                limits=limits, settings=self.config.runner,
                case_dir=self.config.work_dir / "runs" / message.experiment_id / case.case_id,
                max_output_bytes=self.config.policy.max_output_bytes,
                labels={SPOKE_LABEL: self.config.spoke_id,
                        "org.tributary.experiment": message.experiment_id,
                        "org.tributary.case-id": case.case_id,
                        "org.tributary.attempt": str(attempt)},
                on_progress=lambda progress: self._on_progress(activity, progress),
                cancel=activity.cancel,
                on_started=lambda container_id: self._audit(
                    "container.started", name, container_id=container_id,
                    image=message.algorithm.reference, experiment=message.experiment_id,
                    case=case.case_id, attempt=attempt, limits={
                        "memory_mb": limits.memory_mb, "cpus": limits.cpus,
                        "timeout_seconds": limits.timeout_seconds, "network": "none",
                        "pids": self.config.runner.pids_limit, "read_only": True}),
            )
        except Exception as exc:
            log.exception("container for case %s could not run", case.case_id)
            self._audit("container.failed", name, experiment=message.experiment_id,
                        case=case.case_id, error=f"{type(exc).__name__}: {exc}"[:2000])
            return None, Failure(reason=FailureReason.INTERNAL_ERROR,
                                 detail=f"container could not run: {exc}"[:2000]), run
        finally:
            client.close()
        log.info("case %s: %s in %.1f s", case.case_id,
                 outcome.failure.reason if outcome.failure else "succeeded",
                 time.monotonic() - t0)
        self._audit("container.finished", name, experiment=message.experiment_id,
                    case=case.case_id, attempt=attempt, exit_code=outcome.exit_code,
                    outcome=outcome.failure.reason if outcome.failure else "succeeded",
                    duration_seconds=round(time.monotonic() - t_run, 3))
        run["exit_code"] = outcome.exit_code
        return outcome.output, outcome.failure, run


def _as_released(cases: dict[str, CatalogCase]) -> dict[str, CatalogCase]:
    """Each case carrying its released id from here on, so no catalog pseudonym reaches a
    result, a container, a custody record, a log line or the steward's desk."""
    return {released: replace(case, case_id=released) for released, case in cases.items()}


def _subject(message: HubMessage | None) -> str:
    """What a hub message is about, for the audit log: its experiment or count query."""
    return (getattr(message, "experiment_id", None) or getattr(message, "query_id", None)
            or "")
