"""The spoke agent: consumes its own queue, one experiment at a time (prefetch 1), runs the
selected cases concurrently, publishes each result, and acknowledges the experiment only
once every result has been published."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import docker

from tributary import __version__
from tributary.protocol.auditlog import AuditLog
from tributary.protocol.broker import Delivery, PublishError, StompClient, publish_with_retry
from tributary.protocol.destinations import results_queue, spoke_queue
from tributary.protocol.messages import (
    ApprovalRevokedMessage,
    CaseStartedMessage,
    CaseStatus,
    ExperimentMessage,
    ExperimentState,
    ExperimentStatusMessage,
    Failure,
    FailureReason,
    ProtocolError,
    ResultMessage,
)
from tributary.protocol.signing import PublicKey, SigningKey, sha256_hex
from tributary.protocol.wire import open_from_hub, seal
from tributary.spoke.catalog import CatalogCase, SelectionRefused
from tributary.spoke.config import SpokeConfig
from tributary.spoke.custody import CustodyChain, input_digest
from tributary.spoke.images import ImageRefused, check_approval, check_release, ensure_image
from tributary.spoke.ingest import ingest, open_catalog, series_folders
from tributary.spoke.journal import Journal
from tributary.spoke.participant import build_participant
from tributary.spoke.pseudonyms import Pseudonymizer
from tributary.spoke.runner import effective_limits, run_case
from tributary.spoke.store import DEID_PROFILE

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


class SpokeAgent:
    def __init__(self, config: SpokeConfig) -> None:
        self.config = config
        config.work_dir.mkdir(parents=True, exist_ok=True)
        self.pseudonyms = Pseudonymizer.from_key_file(config.work_dir / "pseudonym.key")
        self.journal = Journal(config.work_dir / "journal.db")
        self.audit = AuditLog(config.work_dir / "audit.jsonl")
        self.key = SigningKey.load_or_create(config.work_dir / "spoke.key")
        self.hub_keys = [PublicKey.load(config.hub_public_key)]
        self.publishers = [PublicKey.load(p) for p in config.trust.publisher_keys]
        self.chain = CustodyChain(self.journal, self.key)
        self.client = StompClient(config.broker.settings(), f"spoke-{config.spoke_id}")
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self.stopping = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------
    def run(self) -> None:
        """Consume until :meth:`stop` is called; reconnects to the broker by itself."""
        self.client.start()
        inbox = spoke_queue(self.config.spoke_id, self.config.broker.federation)
        self.client.subscribe(inbox, self._inbox.put)
        log.info("spoke %s (tributary %s) waiting for experiments", self.config.spoke_id,
                 __version__)
        self._audit("spoke.started", self.config.spoke_id, version=__version__)
        try:
            while not self.stopping.is_set():
                try:
                    delivery = self._inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                self.handle(delivery)
        finally:
            self.client.close()
            self.journal.close()

    def stop(self) -> None:
        self.stopping.set()

    # -- one experiment ---------------------------------------------------------------------
    def handle(self, delivery: Delivery) -> None:
        try:
            message = open_from_hub(delivery.body, self.hub_keys)
        except ProtocolError as exc:
            log.error("dead-lettering unreadable message %s: %s", delivery.message_id, exc)
            self._received(delivery, None)
            self._audit("message.dead_lettered", message_id=delivery.message_id,
                        reason=f"unreadable: {exc}")
            self.client.nack(delivery)
            return
        self._received(delivery, message)
        if message.spoke_id != self.config.spoke_id:
            log.error("dead-lettering message for spoke %s", message.spoke_id)
            self._audit("message.dead_lettered", getattr(message, "experiment_id", ""),
                        message_id=delivery.message_id,
                        reason=f"addressed to spoke {message.spoke_id}")
            self.client.nack(delivery)
            return
        if isinstance(message, ApprovalRevokedMessage):
            self.journal.revoke(message.digest, message.reason)
            log.warning("approval of %s %s (%s) revoked: %s", message.name, message.version,
                        message.digest, message.reason)
            self._audit("approval.revoked", message.digest, actor="hub",
                        algorithm=f"{message.name} {message.version}", reason=message.reason)
            self.client.ack(delivery)
            return
        if self.journal.handled(message.message_id):
            log.warning("dropping replayed experiment message %s (%s): already handled",
                        message.message_id, message.experiment_id)
            self._audit("message.dropped", message.experiment_id,
                        message_id=delivery.message_id, reason="replay: already handled")
            self.client.ack(delivery)
            return
        try:
            self.process(message)
        except PublishError as exc:
            # Results are safe in the journal; the unacked message comes back after the
            # reconnect and its results are re-sent from there.
            log.warning("could not publish for %s (%s); will resume on redelivery",
                        message.experiment_id, exc)
            return
        self.journal.mark_handled(message.message_id, message.experiment_id)
        if not self.client.ack(delivery):
            log.info("connection changed before ack of %s; it will be redelivered and "
                     "answered from the journal", message.experiment_id)

    def _audit(self, action: str, target: str = "", actor: str | None = None,
               **detail: Any) -> None:
        """Append to the spoke's forensic log; it is fsynced before the spoke goes on, and
        a failure to write stops the work rather than leave it unrecorded."""
        self.audit.append(actor or self.config.spoke_id, action, target, detail)

    def _received(self, delivery: Delivery,
                  message: ExperimentMessage | ApprovalRevokedMessage | None) -> None:
        self._audit("message.received", getattr(message, "experiment_id", "") or "",
                    actor="hub" if message else "unknown", message_id=delivery.message_id,
                    kind=message.kind if message else delivery.headers.get("tributary-kind"),
                    hub_message_id=message.message_id if message else None,
                    redelivered=delivery.redelivered, size=len(delivery.body),
                    sha256=sha256_hex(delivery.body))

    def _send(self, message: ExperimentStatusMessage | CaseStartedMessage | ResultMessage) -> None:
        publish_with_retry(self.client, results_queue(self.config.broker.federation),
                           seal(message, self.key), {"tributary-kind": message.kind}, attempts=10)
        self._audit("result.published" if isinstance(message, ResultMessage) else "message.sent",
                    message.experiment_id, kind=message.kind, message_id=message.message_id,
                    case=getattr(message, "case_id", None),
                    status=getattr(message, "status", None) or getattr(message, "state", None),
                    reason=getattr(message, "reason", None))

    def _status(self, message: ExperimentMessage, state: ExperimentState,
                case_ids: list[str] | None = None, reason: str | None = None) -> None:
        self._send(ExperimentStatusMessage(
            experiment_id=message.experiment_id, spoke_id=self.config.spoke_id, state=state,
            case_ids=case_ids or [], reason=reason))

    def process(self, message: ExperimentMessage) -> None:
        log.info("experiment %s: %s", message.experiment_id, message.algorithm.reference)
        if message.expires_at is not None and message.expires_at < _now():
            self._status(message, ExperimentState.REFUSED, reason="experiment expired")
            return
        docker_client = docker.from_env(timeout=120)
        reference = message.algorithm.reference
        try:
            check_approval(message.algorithm, self.hub_keys)
            revoked = self.journal.revocation(message.algorithm.digest)
            if revoked is not None:
                raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                                   f"approval revoked by the hub: {revoked}")
            check_release(message.algorithm, self.publishers)
            image_id = ensure_image(
                docker_client, message.algorithm, self.config.runner.allowed_registries,
                on_pull=lambda pulled: self._audit("image.pulled", reference, image_id=pulled))
            self._audit("image.verified", reference, result="verified", image_id=image_id,
                        experiment=message.experiment_id)
        except ImageRefused as exc:
            log.error("refusing %s: %s", message.experiment_id, exc.detail)
            self._audit("image.verified", reference, result="refused", reason=exc.reason,
                        error=exc.detail, experiment=message.experiment_id)
            self._status(message, ExperimentState.REFUSED, reason=f"{exc.reason}: {exc.detail}")
            return
        finally:
            docker_client.close()
        try:
            cases = self._select(message)
        except SelectionRefused as exc:
            log.error("refusing %s: %s", message.experiment_id, exc)
            self._status(message, ExperimentState.REFUSED, reason=str(exc))
            return
        self._status(message, ExperimentState.ACCEPTED, [c.case_id for c in cases])
        with ThreadPoolExecutor(self.config.concurrency,
                                thread_name_prefix="case") as pool:
            list(pool.map(lambda c: self._case(message, c), cases))
        self.chain.flush(self._publish_result)
        self._status(message, ExperimentState.COMPLETED, [c.case_id for c in cases])
        log.info("experiment %s done: %d cases", message.experiment_id, len(cases))

    def _select(self, message: ExperimentMessage) -> list[CatalogCase]:
        """The cohort from the catalog, after an incremental ingest of the sources."""
        catalog = open_catalog(self.config)
        try:
            if self.config.catalog.ingest_before_experiment:
                try:
                    report = ingest(self.config, catalog)
                    self._audit("catalog.ingested", message.experiment_id,
                                stored=report.stored, duplicates=report.duplicates,
                                excluded=report.excluded, unchanged=report.unchanged)
                except Exception as exc:  # select from what is already catalogued
                    log.error("ingest before %s failed: %s", message.experiment_id, exc)
                    self._audit("catalog.ingest_failed", message.experiment_id,
                                error=f"{type(exc).__name__}: {exc}"[:2000])
            cases = catalog.select(message.cohort)
        finally:
            catalog.close()
        self._audit("cohort.selected", message.experiment_id, cases=len(cases),
                    criteria=message.cohort.model_dump(mode="json"))
        return cases

    def _publish_result(self, result: ResultMessage) -> None:
        self._send(result)
        self.journal.mark_published(result)

    def _case(self, message: ExperimentMessage, case: CatalogCase) -> ResultMessage:
        done = self.journal.result(message.experiment_id, case.case_id)
        if done is not None:
            return done  # finished before a restart or lost ack: re-send, never re-run
        started = _now()
        try:
            self._send(CaseStartedMessage(experiment_id=message.experiment_id,
                                          spoke_id=self.config.spoke_id, case_id=case.case_id))
        except PublishError:
            log.warning("could not report the start of %s", case.case_id)
        output, failure, run = self._execute(message, case)
        result = ResultMessage(
            experiment_id=message.experiment_id, spoke_id=self.config.spoke_id,
            case_id=case.case_id, status=CaseStatus.FAILED if failure else CaseStatus.SUCCEEDED,
            output=output, failure=failure,
            released={k: case.attributes[k] for k in message.release
                      if k in self.config.policy.releasable_attributes and k in case.attributes}
            if failure is None else {},
            image_digest=message.algorithm.digest, started_at=started, finished_at=_now(),
        )
        try:
            return self.chain.append_and_publish(result, run, self._publish_result)
        except PublishError:
            log.warning("result of %s kept in the journal until the broker is back",
                        case.case_id)
            return result

    def _execute(self, message: ExperimentMessage, case: CatalogCase
                 ) -> tuple[dict | None, Failure | None, dict]:
        """Run the case; returns output, failure and the facts its custody record states."""
        t0 = time.monotonic()
        run: dict = {"exit_code": None, "participant_sha256": None, "input_sha256": None,
                     "deid_profile": DEID_PROFILE}
        try:
            deidentified = series_folders(self.config, [s.series_id for s in case.series])
            participant, mounts = build_participant(case, message.experiment_id, deidentified)
            run["input_sha256"] = input_digest(deidentified)
            run["participant_sha256"] = sha256_hex(
                participant.model_dump_json(indent=2).encode())
        except Exception as exc:
            log.exception("could not prepare case %s", case.case_id)
            return None, Failure(reason=FailureReason.INPUT_ERROR,
                                 detail=f"case could not be prepared: {type(exc).__name__}"), run
        client = docker.from_env(timeout=120)
        name = f"tributary-{self.config.spoke_id}-{message.experiment_id}-{case.case_id}"
        limits = effective_limits(message.limits, self.config.runner)
        t_run = time.monotonic()
        try:
            outcome = run_case(
                client, message.algorithm.reference, name=name,
                participant=participant, mounts=mounts, arguments=message.arguments,
                limits=limits, settings=self.config.runner,
                case_dir=self.config.work_dir / "runs" / message.experiment_id / case.case_id,
                max_output_bytes=self.config.policy.max_output_bytes,
                labels={"org.tributary.spoke": self.config.spoke_id,
                        "org.tributary.experiment": message.experiment_id},
                on_started=lambda container_id: self._audit(
                    "container.started", name, container_id=container_id,
                    image=message.algorithm.reference, experiment=message.experiment_id,
                    case=case.case_id, limits={
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
                    case=case.case_id, exit_code=outcome.exit_code,
                    outcome=outcome.failure.reason if outcome.failure else "succeeded",
                    duration_seconds=round(time.monotonic() - t_run, 3))
        run["exit_code"] = outcome.exit_code
        return outcome.output, outcome.failure, run
