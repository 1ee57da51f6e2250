"""Running one case as a Slurm batch job: the job runs the image by its digest with Podman
on the compute node, with the runner's isolation (no network, read-only root and inputs,
all capabilities dropped, an unprivileged user, memory, CPU, process and time limits).

The spoke talks to Slurm only through Slurm's own commands: ``sbatch --parsable`` submits,
``squeue`` (one line per job, fields split by ``|``) tells the job's state, ``scancel``
cancels it. Each case attempt is one job with a name derived from it; the name is
journaled before submission and the id right after, so a spoke that restarts adopts the
job (queued, running or already finished) instead of submitting a second one, and a case
stopped by the spoke's own shutdown leaves its job running.

The job script records when the algorithm started and, once the container ends, its exit
status and whether the memory limit killed it, in the case folder on the filesystem the
compute nodes share with the spoke. Pulling by digest makes Podman check the manifest
against it; the spoke checked beforehand that the registry serves exactly that digest and
that the hub approved (and, if the site pins keys, a publisher signed) it."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from tributary.protocol.contract import (
    ALGO_ARG_ENV,
    OUTPUT_DIR,
    PARTICIPANT_PATH,
    PROGRESS_PATH,
    AlgoArg,
    Participant,
    Progress,
)
from tributary.protocol.messages import Failure, FailureReason, RunLimits
from tributary.spoke.config import RunnerSettings, SlurmSettings
from tributary.spoke.journal import Journal
from tributary.spoke.output_files import UnsafeFile, read_bounded
from tributary.spoke.runner import (
    ALGORITHM_USER,
    LABEL,
    RunOutcome,
    classify,
    cut_log_tail,
    prepare_case_dir,
    read_progress,
    stopped,
    with_discarded_files,
    write_participant,
)

log = logging.getLogger(__name__)

#: Job states after which nothing more happens (``squeue --states=all`` keeps showing them
#: for the cluster's MinJobAge).
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED"}
#: How long a job's end may take once cancelled (Slurm's KillWait and the container's
#: removal) before the spoke reports the case anyway.
CANCEL_GRACE_SECONDS = 60
#: How often the case folder is looked at for the job's records.
LOOK_SECONDS = 0.25
#: The job script's records, in the case folder.
STATUS_FILE, STARTED_FILE, LOG_FILE, SCRIPT_FILE = "status.json", "started", "job.log", "job.sh"


class JobStatus(BaseModel):
    """What the job script wrote once the container ended (or could not start)."""

    exit_code: int
    oom: bool = False
    #: Podman could not pull or start the image: the case never ran.
    error: str | None = None


class SlurmError(RuntimeError):
    """A Slurm command failed; the message says which and why."""


@dataclass(frozen=True)
class SlurmCommands:
    """Slurm's commands, with the site's ``SLURM_CONF``."""

    settings: SlurmSettings

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        if self.settings.slurm_conf is not None:
            env["SLURM_CONF"] = str(self.settings.slurm_conf)
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SlurmError(f"{args[0]} failed: {exc}") from None
        if check and done.returncode != 0:
            raise SlurmError(f"{args[0]} failed ({done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[:500]}")
        return done

    def submit(self, script: Path, name: str, limits: RunLimits, log_file: Path,
               workdir: Path) -> str:
        """``sbatch --parsable``: the new job's id."""
        s = self.settings
        args = ["sbatch", "--parsable", f"--job-name={name}", f"--output={log_file}",
                f"--chdir={workdir}", "--nodes=1", "--ntasks=1",
                f"--cpus-per-task={max(1, math.ceil(limits.cpus))}",
                f"--mem={limits.memory_mb + s.memory_overhead_mb}M",
                # Slurm's own limit only matters if the spoke is down: it stops the job
                # itself, to the second, from the time the container started.
                f"--time={math.ceil(limits.timeout_seconds / 60) + 2}", "--no-requeue"]
        args += [f"--gres=gpu:{limits.gpus}"] if limits.gpus else []
        args += [f"--partition={s.partition}"] if s.partition else []
        args += [f"--account={s.account}"] if s.account else []
        args += [f"--qos={s.qos}"] if s.qos else []
        out = self._run([*args, *s.sbatch_options, str(script)]).stdout.strip()
        job_id = out.split(";", 1)[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch gave no job id: {out[:200]!r}")
        return job_id

    def state(self, job_id: str) -> str | None:
        """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``…), None if Slurm no
        longer knows it."""
        done = self._run(["squeue", "--noheader", "--states=all", f"--jobs={job_id}",
                          "--format=%i|%T"], check=False)
        for line in done.stdout.splitlines():
            fields = line.strip().split("|")
            if len(fields) == 2 and fields[0] == job_id:
                return fields[1]
        if done.returncode != 0 and "Invalid job id" not in done.stderr:
            raise SlurmError(f"squeue failed: {done.stderr.strip()[:500]}")
        return None

    def find(self, name: str) -> list[tuple[str, str]]:
        """(id, state) of every job the cluster knows by ``name``."""
        done = self._run(["squeue", "--noheader", "--states=all", f"--name={name}",
                          "--format=%i|%T|%j"])
        found = []
        for line in done.stdout.splitlines():
            fields = line.strip().split("|")
            if len(fields) == 3 and fields[2] == name:
                found.append((fields[0], fields[1]))
        return found

    def cancel(self, job_id: str) -> None:
        self._run(["scancel", job_id], check=False)


def job_name(spoke_id: str, experiment_id: str, case_id: str, attempt: int) -> str:
    return f"tributary-{spoke_id}-{experiment_id}-{case_id}-a{attempt}"


def job_script(podman: list[str], podman_env: dict[str, str], name: str, image: str,
               participant_file: Path, out_dir: Path, mounts: dict[str, Path],
               arguments: dict[str, Any], limits: RunLimits, settings: RunnerSettings,
               labels: dict[str, str], case_dir: Path,
               gpu_device: str = "nvidia.com/gpu=all") -> str:
    """The batch script: pull by digest if missing, run with the runner's isolation, and
    record how the container ended. Every value is shell-quoted."""
    q = shlex.quote
    pod = " ".join(q(p) for p in podman)
    volumes = [f"{participant_file}:{PARTICIPANT_PATH}:ro", f"{out_dir}:{OUTPUT_DIR}:rw",
               *(f"{host}:{path}:ro" for path, host in mounts.items())]
    run = [
        "run", "--name", name, "--pull=never", "--network=none", "--read-only",
        f"--user={ALGORITHM_USER}", "--cap-drop=ALL", "--security-opt=no-new-privileges",
        f"--pids-limit={settings.pids_limit}", f"--memory={limits.memory_mb}m",
        f"--memory-swap={limits.memory_mb}m", f"--cpus={limits.cpus}",
        f"--tmpfs=/tmp:rw,noexec,nosuid,size={limits.tmp_mb or settings.tmpfs_mb}m",
        "--workdir=/tmp",
        # The job's GPUs (``--gres``), through the nodes' CDI specification; Slurm's device
        # cgroup keeps the container to the ones it allocated.
        *([f"--device={gpu_device}"] if limits.gpus else []),
        "--env", f"{ALGO_ARG_ENV}={AlgoArg(arguments=arguments).model_dump_json()}",
        *(f"--volume={v}" for v in volumes),
        *(f"--label={k}={v}" for k, v in {LABEL: name, **labels}.items()), image]
    status, started = case_dir / STATUS_FILE, case_dir / STARTED_FILE
    exports = "".join(f"export {k}={q(v)}\n" for k, v in podman_env.items())
    return f"""#!/bin/sh
# One Tributary case, submitted by the spoke: see tributary.spoke.slurm.
{exports}name={q(name)}
status={q(str(status))}
record() {{ printf '%s\\n' "$1" > "$status.tmp" && mv "$status.tmp" "$status"; }}
stop() {{
  {pod} rm --force --time 0 "$name" >/dev/null 2>&1
  record '{{"exit_code": 143}}'
  exit 143
}}
trap stop TERM INT
{pod} rm --force --time 0 "$name" >/dev/null 2>&1
if ! {pod} image exists {q(image)}; then
  if ! {pod} pull --quiet {q(image)} >/dev/null; then
    record '{{"exit_code": 125, "error": "the compute node could not pull the image"}}'
    exit 0
  fi
fi
date +%s > {q(str(started))}
{pod} {" ".join(q(a) for a in run)} &
wait $!
code=$?
oom=$({pod} inspect --format '{{{{.State.OOMKilled}}}}' "$name" 2>/dev/null)
{pod} rm --force --time 0 "$name" >/dev/null 2>&1
[ "$oom" = true ] || oom=false
record "{{\\"exit_code\\": $code, \\"oom\\": $oom}}"
"""


class SlurmRunner:
    """Runs cases as Slurm jobs and keeps the journal's record of each job."""

    def __init__(self, settings: SlurmSettings, journal: Journal) -> None:
        self.settings = settings
        self.journal = journal
        self.slurm = SlurmCommands(settings)

    def run_case(self, image: str, key: tuple[str, str, int], name: str,
                 participant: Participant, mounts: dict[str, Path],
                 arguments: dict[str, Any], limits: RunLimits, settings: RunnerSettings,
                 case_dir: Path, max_output_bytes: int, labels: dict[str, str],
                 on_started: Callable[[str], None] | None = None,
                 on_progress: Callable[[Progress], None] | None = None,
                 cancel: threading.Event | None = None,
                 detach: Callable[[], bool] = lambda: False) -> RunOutcome:
        """Run (or adopt) the case's job to its end and classify it. ``key`` is (experiment,
        case, attempt). When ``cancel`` is set the job is cancelled, unless ``detach()``
        says the spoke itself is stopping: then the job keeps running and the case is
        reported cancelled, to be adopted at the next start."""
        out_dir = case_dir / "output"
        job_id = self._adopt(key, case_dir)
        if job_id is None:
            prepared = prepare_case_dir(case_dir, settings, quota=False)
            if isinstance(prepared, RunOutcome):
                return prepared
            participant_file = write_participant(case_dir, participant)
            script = case_dir / SCRIPT_FILE
            script.write_text(job_script(
                self.settings.podman, self.settings.podman_env, name, image,
                participant_file, out_dir, mounts, arguments, limits, settings, labels,
                case_dir, self.settings.gpu_device))
            self.journal.job_intent(key, name)
            job_id = self.slurm.submit(script, name, limits, case_dir / LOG_FILE, case_dir)
            self.journal.job_submitted(key, job_id)
            log.info("case %s submitted as Slurm job %s", key[1], job_id)
        else:
            log.info("case %s: adopted Slurm job %s", key[1], job_id)
        if on_started is not None:
            on_started(f"slurm:{job_id}")
        ended = self._wait(job_id, case_dir, limits, on_progress, cancel, detach)
        tail = lambda: _tail(case_dir / LOG_FILE, settings.log_tail_lines)  # noqa: E731
        if ended == "detached":
            return stopped("cancelled", limits, "")
        if ended in ("cancelled", "timeout"):
            return with_discarded_files(stopped(ended, limits, tail()), out_dir)
        status = _status(case_dir)
        if ended != "recorded" or status is None:
            return RunOutcome(None, Failure(
                reason=FailureReason.KILLED if ended == "CANCELLED"
                else FailureReason.INTERNAL_ERROR, log_tail=tail(),
                detail=f"Slurm job {job_id} ended {ended} before the container did "
                       "(cancelled or failed outside the spoke); the hub may retry the case"),
                None)
        if status.error:
            return RunOutcome(None, Failure(reason=FailureReason.IMAGE_UNAVAILABLE,
                                            detail=status.error, log_tail=tail()), None)
        return classify(status.exit_code, status.oom, tail, out_dir, limits, settings,
                        max_output_bytes, oom_reported=False)

    def _adopt(self, key: tuple[str, str, int], case_dir: Path) -> str | None:
        """The id of this case's job if it was submitted before (by an earlier spoke
        process) and Slurm still knows it or it left its status; None to submit one."""
        known = self.journal.job(key)
        if known is None:
            return None
        name, job_id = known
        if job_id is None:  # the spoke died between sbatch and journaling the id
            found = self.slurm.find(name)
            if not found:
                return None
            job_id = found[-1][0]
            self.journal.job_submitted(key, job_id)
        if self.slurm.state(job_id) is None and _status(case_dir) is None:
            return None  # gone from the cluster without a trace: submit again
        return job_id

    def _wait(self, job_id: str, case_dir: Path, limits: RunLimits,
              on_progress: Callable[[Progress], None] | None,
              cancel: threading.Event | None, detach: Callable[[], bool]) -> str:
        """Until the job ends: "recorded" (the job script wrote how the container ended),
        its final Slurm state when it ended without that, "cancelled" / "timeout" (the spoke
        cancelled it), or "detached" (the spoke is stopping; the job goes on). The case
        folder is looked at often (cheap, and how a finished case is noticed at once);
        Slurm is asked every ``poll_seconds``."""
        last: Progress | None = None
        progress_file = case_dir / "output" / Path(PROGRESS_PATH).name
        asked = 0.0
        event = cancel or threading.Event()
        while True:
            if event.is_set():
                if detach():
                    return "detached"
                self._cancel(job_id, case_dir)
                return "cancelled"
            if _status(case_dir) is not None:
                return "recorded"
            if time.monotonic() - asked >= self.settings.poll_seconds:
                asked = time.monotonic()
                try:
                    state = self.slurm.state(job_id)
                except SlurmError as exc:  # a controller restarting: the job goes on
                    log.warning("Slurm job %s: %s; asking again", job_id, exc)
                    state = "UNKNOWN"
                if state is None or state in ENDED:
                    return "recorded" if _status(case_dir) is not None else state or "GONE"
            started = _started_at(case_dir)
            if started is not None:
                if time.time() - started > limits.timeout_seconds:
                    self._cancel(job_id, case_dir)
                    return "timeout"
                if on_progress is not None:
                    progress = read_progress(progress_file)
                    if progress is not None and progress != last:
                        last = progress
                        on_progress(progress)
            event.wait(min(LOOK_SECONDS, self.settings.poll_seconds))

    def _cancel(self, job_id: str, case_dir: Path) -> None:
        """scancel, then wait (bounded) until Slurm says the job ended and, if its
        container had started, the job script recorded that it removed it: no container
        is left when the case is reported."""
        started = _started_at(case_dir) is not None
        self.slurm.cancel(job_id)
        deadline = time.monotonic() + CANCEL_GRACE_SECONDS
        while time.monotonic() < deadline:
            if not started or _status(case_dir) is not None:
                try:
                    state = self.slurm.state(job_id)
                except SlurmError:
                    state = "UNKNOWN"
                if state is None or state in ENDED:
                    return
            time.sleep(0.25)
        log.warning("Slurm job %s did not end within %d s of its cancellation", job_id,
                    CANCEL_GRACE_SECONDS)

    def stop_stale(self) -> list[dict[str, str]]:
        """At start-up: cancel the jobs whose cases no longer want them (their experiment
        was cancelled while the spoke was down). Returns what was cancelled."""
        cancelled = []
        for key, name, job_id in self.journal.jobs_to_stop():
            for found_id, state in self.slurm.find(name):
                if state not in ENDED and (job_id is None or found_id == job_id):
                    self.slurm.cancel(found_id)
                    cancelled.append({"name": name, "id": f"slurm:{found_id}",
                                      "org.tributary.experiment": key[0]})
            self.journal.forget_job(key)
        return cancelled


def _status(case_dir: Path) -> JobStatus | None:
    try:
        return JobStatus.model_validate_json(read_bounded(case_dir / STATUS_FILE, 4096))
    except (UnsafeFile, ValidationError, json.JSONDecodeError):
        return None


def _started_at(case_dir: Path) -> float | None:
    try:
        return float(read_bounded(case_dir / STARTED_FILE, 64).decode().strip())
    except (UnsafeFile, ValueError, UnicodeDecodeError):
        return None


def _tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of the job's log (Slurm writes it; its end is enough),
    read without following links."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(max(0, size - 64 * 1024))
        raw = handle.read(64 * 1024)
    return cut_log_tail(b"\n".join(raw.splitlines()[-lines:]))
