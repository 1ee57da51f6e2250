"""Case execution: one claimed case, on a case worker thread, from its checks (cancelled,
already held for the steward, launched too often, image revoked, gone from the catalog)
through its isolated container to a signed :class:`ResultMessage` in the custody chain and
the outbox, or held for the steward's review. A case stopped by a spoke shutdown goes
back to the queue and runs again at the next start; every other ending is journaled once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker.errors

from tributary.protocol.contract import Progress
from tributary.protocol.messages import (
    MAX_MESSAGE_BYTES,
    CaseProgressMessage,
    CaseStartedMessage,
    CaseStatus,
    ExperimentMessage,
    Failure,
    FailureReason,
    ResultMessage,
    RunLimits,
)
from tributary.protocol.wire import seal
from tributary.spoke.cases import CaseInput, Cases
from tributary.spoke.catalog import CatalogCase, released_attributes
from tributary.spoke.config import SpokeConfig
from tributary.spoke.custody import CustodyChain
from tributary.spoke.deid import profile_name
from tributary.spoke.engines import engine_client, engine_name
from tributary.spoke.failure_release import released_failure, with_applied_limits
from tributary.spoke.journal import CaseRow
from tributary.spoke.lifecycle import Lifecycle
from tributary.spoke.liveness import AuditProgress, CaseActivity, ProgressReporter, RunningCases
from tributary.spoke.runner import (
    SPOKE_LABEL,
    RunOutcome,
    effective_limits,
    remove_orphans,
    run_case,
)
from tributary.spoke.slurm import SlurmError, SlurmRunner
from tributary.spoke.steward import Steward

log = logging.getLogger(__name__)
#: Room left in a result message for its custody record (signed, base64 inside DSSE).
CUSTODY_ALLOWANCE_BYTES = 16 * 1024


def _now() -> datetime:
    return datetime.now(UTC)


def progress_audit(lifecycle: Lifecycle) -> AuditProgress:
    """How a progress message is recorded in the audit log before it is sent."""
    def audit(activity: CaseActivity, message: CaseProgressMessage) -> None:
        lifecycle.audit("progress.sent", activity.experiment_id, message_id=message.message_id,
                        case=activity.case_id, attempt=activity.attempt,
                        fraction=message.fraction, step=message.message,
                        report=activity.progress_reports + 1)
    return audit


class CaseExecution:
    """Runs claimed cases (``run`` is what a case worker thread does) and removes the
    containers a dead spoke process left behind."""

    def __init__(self, config: SpokeConfig, lifecycle: Lifecycle, cases: Cases,
                 steward: Steward, chain: CustodyChain, running: RunningCases,
                 progress: ProgressReporter, stopping: threading.Event) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.journal = lifecycle.journal
        self.cases = cases
        self.steward = steward
        self.chain = chain
        self.running = running
        self.progress = progress
        self.stopping = stopping
        #: What the configured options make; a case states the profile its store files
        #: were actually made under (the catalog's record).
        self.deid_profile = profile_name(config.deidentification)
        self.slurm = (SlurmRunner(config.execution.slurm, self.journal)
                      if config.execution.engine == "slurm" else None)

    def remove_orphans(self) -> None:
        """Remove the containers a dead spoke process left (labelled with this spoke's
        id), each audited. On Slurm, jobs are adopted by their cases instead; only those
        of cases that no longer want them (cancelled meanwhile) are cancelled."""
        if self.slurm is not None:
            try:
                stale = self.slurm.stop_stale()
            except SlurmError as exc:
                log.error("could not look for stale Slurm jobs: %s", exc)
                self.lifecycle.audit("slurm.stale_check_failed", self.config.spoke_id,
                                     error=str(exc))
                return
            for job in stale:
                log.warning("cancelled stale Slurm job %s", job["name"])
                self.lifecycle.audit("slurm.job_cancelled", job["name"], job=job["id"],
                                     experiment=job["org.tributary.experiment"])
            return
        try:
            client = engine_client(self.config.execution)
            try:
                removed = remove_orphans(client, self.config.spoke_id,
                                         self.config.work_dir / "runs")
            finally:
                client.close()
        except docker.errors.DockerException as exc:
            log.error("could not look for orphaned containers: %s", exc)
            self.lifecycle.audit("container.orphan_check_failed", self.config.spoke_id,
                                 error=str(exc))
            return
        for labels in removed:
            log.warning("removed orphaned container %s", labels.get("name"))
            self.lifecycle.audit("container.orphan_removed", labels.get("name", ""),
                                 container_id=labels.get("id"),
                                 experiment=labels.get("org.tributary.experiment"),
                                 case=labels.get("org.tributary.case-id"),
                                 attempt=labels.get("org.tributary.attempt"))

    def run(self, message: ExperimentMessage, row: CaseRow, activity: CaseActivity) -> None:
        """One case worker's job: run the case, whatever happens leave the running cases,
        and see whether its experiment is finished."""
        try:
            result = self._run_case(message, row, activity)
            if result is not None:
                self.lifecycle.wake_outbox()
        except Exception:
            log.exception("case %s of %s failed inside the spoke", row.case_id,
                          row.experiment_id)
            if not self.stopping.is_set():
                self._finish_case(message, row, activity.started_at, None, Failure(
                    reason=FailureReason.INTERNAL_ERROR,
                    detail="the spoke could not complete this case; see its log"),
                    self._empty_run())
        finally:
            self.running.leave(row.experiment_id, row.case_id)
            self.lifecycle.maybe_finish(row.experiment_id)
            self.lifecycle.wake()

    def _run_case(self, message: ExperimentMessage, row: CaseRow,
                  activity: CaseActivity) -> ResultMessage | None:
        """Run one claimed case and journal its signed result; None if the spoke is
        stopping (the case stays queued and runs at the next start)."""
        if self.journal.cancellation(row.experiment_id) is not None:
            self.journal.cancel(row.experiment_id, "", "")
            self.journal.drop_case(row)
            if self.slurm is not None:  # a job an earlier spoke process submitted
                self.slurm.stop_stale()
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
        case = self.cases.cohort(message).get(row.case_id)
        if case is None:
            return self._finish_case(message, row, started, None, Failure(
                reason=FailureReason.INPUT_ERROR,
                detail="the case is no longer in the spoke's catalog"), self._empty_run())
        self.lifecycle.send_later(CaseStartedMessage(
            experiment_id=row.experiment_id, spoke_id=self.config.spoke_id,
            case_id=row.case_id, attempt=row.attempt))
        output, failure, run = self._execute(message, case, row.attempt, activity)
        if output is not None and self.cases.names_store_pseudonym(row.experiment_id, case,
                                                                   output):
            output, failure = None, Failure(
                reason=FailureReason.INVALID_OUTPUT,
                detail="the output names the site's own case or series pseudonym (as found "
                       "in the input's headers), which never leaves the spoke")
        if (failure is not None and failure.reason == FailureReason.CANCELLED
                and self.journal.cancellation(row.experiment_id) is None):
            self.journal.release_case(row)  # stopped by a spoke shutdown, not the hub
            self.lifecycle.audit("case.released", row.experiment_id, case=row.case_id,
                                 attempt=row.attempt, reason="spoke stopping")
            return None
        return self._finish_case(message, row, started, output, failure, run, case)

    def _finish_case(self, message: ExperimentMessage, row: CaseRow, started: datetime,
                     output: dict | None, failure: Failure | None, run: dict,
                     case: CatalogCase | None = None) -> ResultMessage | None:
        """Sign the case's result into the custody chain and queue it for the hub; or,
        when the site's steward reviews results, hold it (None) until it is released."""
        failure = released_failure(failure, self.config.policy.log_tails)
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
        size = len(seal(result, self.chain.key)) + CUSTODY_ALLOWANCE_BYTES
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
                self.lifecycle.audit("steward.discarded", row.experiment_id, case=row.case_id,
                                     attempt=row.attempt,
                                     reason="the hub cancelled the experiment")
                return None
            self.steward.hold_result(result, run)
            self.journal.hold_case(row)
            return None
        return self.chain.append(result, run)

    def _empty_run(self) -> dict[str, Any]:
        """The facts a custody record states about a run, before any are known."""
        return {"exit_code": None, "participant_sha256": None, "input_sha256": None,
                "deid_profile": self.deid_profile}

    def _execute(self, message: ExperimentMessage, case: CatalogCase, attempt: int,
                 activity: CaseActivity) -> tuple[dict | None, Failure | None, dict]:
        """Run the case; returns output, failure and the facts its custody record states."""
        t0 = time.monotonic()
        run = self._empty_run()
        try:
            run["deid_profile"] = self.cases.store_profile() or self.deid_profile
            prepared = self.cases.input(message.experiment_id, case)
        except Exception as exc:
            log.exception("could not prepare case %s", case.case_id)
            return None, Failure(reason=FailureReason.INPUT_ERROR,
                                 detail=f"case could not be prepared: {type(exc).__name__}"), run
        run["input_sha256"] = prepared.input_sha256
        run["participant_sha256"] = prepared.participant_sha256
        name = (f"tributary-{self.config.spoke_id}-{message.experiment_id}-{case.case_id}"
                f"-a{attempt}")
        limits = effective_limits(message.limits, self.config.runner)
        t_run = time.monotonic()

        def started(container_id: str) -> None:
            self.lifecycle.audit(
                "container.started", name, container_id=container_id,
                image=message.algorithm.reference, experiment=message.experiment_id,
                case=case.case_id, attempt=attempt, engine=self.config.execution.engine,
                limits={
                    "memory_mb": limits.memory_mb, "cpus": limits.cpus,
                    "timeout_seconds": limits.timeout_seconds, "gpus": limits.gpus,
                    "tmp_mb": limits.tmp_mb, "network": "none",
                    "pids": self.config.runner.pids_limit, "read_only": True})

        def progressed(progress: Progress) -> None:
            self.progress.report(activity, progress)

        labels = {SPOKE_LABEL: self.config.spoke_id,
                  "org.tributary.experiment": message.experiment_id,
                  "org.tributary.case-id": case.case_id, "org.tributary.attempt": str(attempt)}
        try:
            outcome = self._run(message, case.case_id, attempt, name, prepared, limits,
                                labels, activity, started, progressed)
        except Exception as exc:
            log.exception("container for case %s could not run", case.case_id)
            self.lifecycle.audit("container.failed", name, experiment=message.experiment_id,
                                 case=case.case_id, error=f"{type(exc).__name__}: {exc}"[:2000])
            return None, Failure(reason=FailureReason.INTERNAL_ERROR,
                                 detail=f"container could not run: {exc}"[:2000]), run
        log.info("case %s: %s in %.1f s", case.case_id,
                 outcome.failure.reason if outcome.failure else "succeeded",
                 time.monotonic() - t0)
        self.lifecycle.audit(
            "container.finished", name, experiment=message.experiment_id, case=case.case_id,
            attempt=attempt, exit_code=outcome.exit_code,
            outcome=outcome.failure.reason if outcome.failure else "succeeded",
            duration_seconds=round(time.monotonic() - t_run, 3))
        run["exit_code"] = outcome.exit_code
        return outcome.output, with_applied_limits(outcome.failure, limits), run

    def _run(self, message: ExperimentMessage, case_id: str, attempt: int, name: str,
             prepared: CaseInput, limits: RunLimits, labels: dict[str, str],
             activity: CaseActivity, started: Callable[[str], None],
             progressed: Callable[[Progress], None]) -> RunOutcome:
        """Run the case on the site's executor: a Slurm job, or a container of the Docker
        engine or of Podman (the same API and flags)."""
        if self.slurm is not None:
            shared = self.config.execution.slurm.shared_dir or self.config.work_dir / "runs"
            return self.slurm.run_case(
                message.algorithm.reference, (message.experiment_id, case_id, attempt),
                name=name, participant=prepared.participant, mounts=prepared.mounts,
                arguments=message.arguments, limits=limits, settings=self.config.runner,
                case_dir=shared / message.experiment_id / case_id / f"a{attempt}",
                max_output_bytes=self.config.policy.max_output_bytes, labels=labels,
                on_progress=progressed, cancel=activity.cancel, on_started=started,
                detach=self.stopping.is_set)
        try:
            client = engine_client(self.config.execution)
        except docker.errors.DockerException as exc:
            raise RuntimeError(f"{engine_name(self.config.execution)} unavailable: "
                               f"{exc}") from exc
        try:
            return run_case(
                client, message.algorithm.reference, name=name,
                participant=prepared.participant, mounts=prepared.mounts,
                arguments=message.arguments, limits=limits, settings=self.config.runner,
                case_dir=self._case_dir(message.experiment_id, case_id),
                max_output_bytes=self.config.policy.max_output_bytes, labels=labels,
                on_progress=progressed, cancel=activity.cancel, on_started=started,
                oom_reported=self.config.execution.engine == "docker",
                algorithm_uid=self.config.execution.algorithm_uid)
        finally:
            client.close()

    def _case_dir(self, experiment_id: str, case_id: str) -> Path:
        return self.config.work_dir / "runs" / experiment_id / case_id
