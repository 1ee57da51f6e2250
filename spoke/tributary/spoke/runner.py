"""Running one case in an isolated container: no network, read-only root and inputs,
all capabilities dropped, an unprivileged user, memory, CPU, process and time limits.
Only ``output.json`` is read back, and only if it is a small regular JSON object."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import requests.exceptions

from tributary.protocol.contract import (
    ALGO_ARG_ENV,
    OUTPUT_DIR,
    OUTPUT_PATH,
    PARTICIPANT_PATH,
    PROGRESS_LIMIT_BYTES,
    PROGRESS_PATH,
    AlgoArg,
    ExitCode,
    Participant,
    Progress,
)
from tributary.protocol.messages import (
    DISCARDED_NAME_MAX_CHARS,
    LOG_TAIL_MAX_BYTES,
    MAX_DISCARDED_FILES,
    DiscardedFile,
    Failure,
    FailureReason,
    RunLimits,
    SiteCapacity,
)
from tributary.spoke import output_quota
from tributary.spoke.config import RunnerSettings
from tributary.spoke.output_files import Refusal, UnsafeFile, leftover_files, read_bounded

#: The uid:gid algorithms run as ("nobody").
ALGORITHM_USER = "65534:65534"
LABEL = "org.tributary.case"
#: Label naming the spoke that owns a container: after a crash, the spoke removes every
#: container carrying its id (see :func:`remove_orphans`).
SPOKE_LABEL = "org.tributary.spoke"
#: How often a running container is checked for progress and for cancellation.
POLL_SECONDS = 1.0
#: Exit statuses of a container stopped by a signal: SIGKILL (docker kill) and SIGTERM
#: (docker stop). When neither the spoke nor the memory limit did it, someone else did.
SIGNAL_EXITS = {137: "SIGKILL", 143: "SIGTERM"}


@dataclass(frozen=True)
class RunOutcome:
    output: dict[str, Any] | None
    failure: Failure | None
    exit_code: int | None


def effective_limits(asked: RunLimits, site: RunnerSettings) -> RunLimits:
    """The experiment's limits, capped by what the site allows: /tmp is the study's size
    (else the site's default) up to the site's cap. GPUs are never cut down silently: a
    study asking more than the site offers is refused at admission (:func:`limits_refusal`)."""
    return RunLimits(timeout_seconds=min(asked.timeout_seconds, site.max_timeout_seconds),
                     memory_mb=min(asked.memory_mb, site.max_memory_mb),
                     cpus=min(asked.cpus, site.max_cpus),
                     gpus=min(asked.gpus, site.max_gpus),
                     tmp_mb=min(asked.tmp_mb or site.tmpfs_mb, site.max_tmp_mb))


def site_capacity(site: RunnerSettings, engine: str) -> SiteCapacity:
    """What one case may have at this site, as its heartbeats report it to the hub."""
    return SiteCapacity(engine=engine, max_gpus=site.max_gpus, max_tmp_mb=site.max_tmp_mb,
                        max_timeout_seconds=site.max_timeout_seconds,
                        max_memory_mb=site.max_memory_mb, max_cpus=site.max_cpus)


def limits_refusal(asked: RunLimits, site: RunnerSettings, engine: str) -> str | None:
    """Why this site cannot run a study with these limits, or None: it asks for more GPUs
    than a case may have here, or for any on an executor that cannot pass them on. The hub
    applies the same rule to the capacity the spoke reports, before launching."""
    return site_capacity(site, engine).refusal(asked)


def gpu_requests(gpus: int) -> list[docker.types.DeviceRequest] | None:
    """The engine's device requests for ``gpus`` GPUs (as ``docker run --gpus N``); None
    for none, so engines whose API predates device requests are not sent the field."""
    if not gpus:
        return None
    return [docker.types.DeviceRequest(count=gpus, capabilities=[["gpu"]])]


def read_output(path: Path, limit: int) -> dict[str, Any]:
    """Read output.json without blocking or following links, refusing anything but a small
    regular file holding a JSON object (see :mod:`tributary.spoke.output_files`)."""
    try:
        raw = read_bounded(path, limit)
    except UnsafeFile as exc:
        reason = {Refusal.MISSING: FailureReason.MISSING_OUTPUT,
                  Refusal.TOO_LARGE: FailureReason.OUTPUT_TOO_LARGE}.get(
                      exc.refusal, FailureReason.INVALID_OUTPUT)
        detail = ("the algorithm wrote no output.json" if exc.refusal == Refusal.MISSING
                  else exc.detail)
        raise OutputError(reason, detail) from None
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise OutputError(FailureReason.INVALID_OUTPUT,
                          f"output.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OutputError(FailureReason.INVALID_OUTPUT,
                          f"output.json must be a JSON object, not {type(data).__name__}")
    return data


def read_progress(path: Path) -> Progress | None:
    """The algorithm's progress file, or None when it is absent, not a small regular file
    or invalid: progress is a courtesy, never a reason to fail a case, and reading it never
    blocks the thread that enforces the case's time limit."""
    try:
        raw = read_bounded(path, PROGRESS_LIMIT_BYTES)
    except UnsafeFile:
        return None
    try:
        return Progress.model_validate_json(raw)
    except ValueError:
        return None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


class OutputError(Exception):
    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def prepare_case_dir(case_dir: Path, settings: RunnerSettings, quota: bool = True,
                     owner: int = 65534) -> Path | RunOutcome:
    """A fresh case folder with an empty output folder the algorithm's user may write
    (a tmpfs of the site's quota when ``quota``), owned by ``owner``, the host uid the
    algorithm's user appears as; a failed outcome if the quota cannot be put in place,
    since the case must not run without it."""
    out_dir = case_dir / "output"
    output_quota.unmount(out_dir)  # a spoke that died mid-case may have left it mounted
    if case_dir.exists():
        shutil.rmtree(case_dir)
    out_dir.mkdir(parents=True)
    if quota and settings.output_quota_mb:
        try:
            output_quota.mount(out_dir, settings.output_quota_mb, owner)
        except output_quota.QuotaError as exc:
            return RunOutcome(None, Failure(reason=FailureReason.INTERNAL_ERROR,
                                            detail=str(exc)), None)
    else:
        os.chown(out_dir, owner, owner) if os.geteuid() == 0 else out_dir.chmod(0o777)
    return out_dir


def write_participant(case_dir: Path, participant: Participant) -> Path:
    participant_file = case_dir / "participant.json"
    participant_file.write_text(participant.model_dump_json(indent=2))
    participant_file.chmod(0o644)
    return participant_file


def run_case(client: docker.DockerClient, image: str, name: str, participant: Participant,
             mounts: dict[str, Path], arguments: dict[str, Any], limits: RunLimits,
             settings: RunnerSettings, case_dir: Path, max_output_bytes: int,
             labels: dict[str, str],
             on_started: Callable[[str], None] | None = None,
             on_progress: Callable[[Progress], None] | None = None,
             cancel: threading.Event | None = None, oom_reported: bool = True,
             algorithm_uid: int = 65534) -> RunOutcome:
    """Run one case to completion and classify what happened. ``client`` speaks the Docker
    engine's API: the Docker engine's own or Podman's compatible one (``oom_reported``
    False: see :func:`classify`). ``on_started`` is told the container's id once it runs
    (for the audit log); ``on_progress`` each new value of the algorithm's progress file;
    setting ``cancel`` kills the container and fails the case as cancelled.
    ``algorithm_uid``: the host uid the container's user 65534 appears as (another for
    rootless Podman), which must own the output folder."""
    out_dir = prepare_case_dir(case_dir, settings, owner=algorithm_uid)
    if isinstance(out_dir, RunOutcome):
        return out_dir
    try:
        return _run_container(client, image, name, participant, mounts, arguments, limits,
                              settings, case_dir, out_dir, max_output_bytes, labels,
                              on_started, on_progress, cancel, oom_reported)
    finally:
        output_quota.unmount(out_dir)
        shutil.rmtree(out_dir, ignore_errors=True)


def _run_container(client: docker.DockerClient, image: str, name: str,
                   participant: Participant, mounts: dict[str, Path],
                   arguments: dict[str, Any], limits: RunLimits, settings: RunnerSettings,
                   case_dir: Path, out_dir: Path, max_output_bytes: int,
                   labels: dict[str, str], on_started: Callable[[str], None] | None,
                   on_progress: Callable[[Progress], None] | None,
                   cancel: threading.Event | None, oom_reported: bool) -> RunOutcome:
    """Start the container with the prepared output folder and classify its end."""
    participant_file = write_participant(case_dir, participant)
    volumes = {str(participant_file): {"bind": PARTICIPANT_PATH, "mode": "ro"},
               str(out_dir): {"bind": OUTPUT_DIR, "mode": "rw"}}
    volumes.update({str(host): {"bind": path, "mode": "ro"} for path, host in mounts.items()})
    remove_container(client, name)
    container = client.containers.create(
        image, **container_options(name, arguments, limits, settings, volumes, labels))
    try:
        container.start()
    except docker.errors.APIError as exc:
        # E.g. GPUs asked for on a host whose engine has no GPU driver: the case fails
        # saying so, and no created container is left behind.
        remove_container(client, name)
        return RunOutcome(None, Failure(
            reason=FailureReason.INTERNAL_ERROR,
            detail=f"the engine could not start the container: {exc.explanation or exc}"[:2000]),
            None)
    try:
        if on_started is not None:
            on_started(container.id)
        ended = _wait(container, limits.timeout_seconds, out_dir / Path(PROGRESS_PATH).name,
                      on_progress, cancel)
        if isinstance(ended, str):  # the spoke stopped it: timeout or cancellation
            with contextlib.suppress(docker.errors.APIError):
                container.kill()
            with contextlib.suppress(Exception):
                container.wait(timeout=30)
            return with_discarded_files(
                stopped(ended, limits, _log_tail(container, settings.log_tail_lines)), out_dir)
        container.reload()
        oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
        return classify(ended, oom, lambda: _log_tail(container, settings.log_tail_lines),
                        out_dir, limits, settings, max_output_bytes, oom_reported)
    finally:
        remove_container(client, name)


def container_options(name: str, arguments: dict[str, Any], limits: RunLimits,
                      settings: RunnerSettings, volumes: dict[str, dict[str, str]],
                      labels: dict[str, str]) -> dict[str, Any]:
    """The engine options of a case's container: isolation, the (capped) limits, a /tmp
    tmpfs of the case's size, the GPUs it may use, and its mounts."""
    return dict(
        name=name, environment={ALGO_ARG_ENV: AlgoArg(arguments=arguments).model_dump_json()},
        network_mode="none", read_only=True, user=ALGORITHM_USER, cap_drop=["ALL"],
        security_opt=["no-new-privileges"], pids_limit=settings.pids_limit,
        mem_limit=f"{limits.memory_mb}m", memswap_limit=f"{limits.memory_mb}m",
        nano_cpus=int(limits.cpus * 1e9),
        tmpfs={"/tmp": f"rw,noexec,nosuid,size={limits.tmp_mb or settings.tmpfs_mb}m"},
        device_requests=gpu_requests(limits.gpus),
        volumes=volumes, labels={LABEL: name, **labels}, working_dir="/tmp")


def stopped(ended: str, limits: RunLimits, tail: str) -> RunOutcome:
    """The outcome of a case the spoke stopped: ``ended`` is "cancelled" or "timeout"."""
    reason = FailureReason.CANCELLED if ended == "cancelled" else FailureReason.TIMEOUT
    detail = ("the hub cancelled the experiment; container stopped" if ended == "cancelled"
              else f"no result within {limits.timeout_seconds} s; container killed")
    return RunOutcome(None, Failure(reason=reason, detail=detail, log_tail=tail), None)


def classify(exit_code: int, oom: bool, log_tail: Callable[[], str], out_dir: Path,
             limits: RunLimits, settings: RunnerSettings,
             max_output_bytes: int, oom_reported: bool = True) -> RunOutcome:
    """The outcome of a finished case (see :func:`_classify`); a failure names the files the
    algorithm left besides output.json and progress.json, which are discarded."""
    outcome = _classify(exit_code, oom, log_tail, out_dir, limits, settings,
                        max_output_bytes, oom_reported)
    return with_discarded_files(outcome, out_dir)


def with_discarded_files(outcome: RunOutcome, out_dir: Path) -> RunOutcome:
    """A failed outcome carrying the names and sizes (never the content) of the other files
    in the output folder, so the developer learns what their algorithm wrote and where."""
    if outcome.failure is None:
        return outcome
    keep = {Path(OUTPUT_PATH).name, Path(PROGRESS_PATH).name}
    files = [DiscardedFile(name=name, size_bytes=size) for name, size in leftover_files(
        out_dir, keep, MAX_DISCARDED_FILES, DISCARDED_NAME_MAX_CHARS)]
    if not files:
        return outcome
    return replace(outcome, failure=outcome.failure.model_copy(
        update={"discarded_files": files}))


def _classify(exit_code: int, oom: bool, log_tail: Callable[[], str], out_dir: Path,
              limits: RunLimits, settings: RunnerSettings,
              max_output_bytes: int, oom_reported: bool = True) -> RunOutcome:
    """What an algorithm that exited with ``exit_code`` produced: its output, or the
    failure with its reason. ``log_tail`` is asked only when a failure needs it (a case
    that succeeded sends no log). ``oom_reported``: the engine reliably says when the
    memory limit killed a container (Podman on cgroup v1 does not)."""
    if oom:
        return RunOutcome(None, Failure(reason=FailureReason.OUT_OF_MEMORY, exit_code=exit_code,
                                        detail=f"killed at the {limits.memory_mb} MiB limit",
                                        log_tail=log_tail()), exit_code)
    if exit_code == 137 and not oom_reported:
        return RunOutcome(None, Failure(
            reason=FailureReason.KILLED, exit_code=exit_code, log_tail=log_tail(),
            detail=f"the container was stopped by SIGKILL: by its {limits.memory_mb} MiB "
                   "memory limit (which this engine does not always report) or from outside "
                   "the spoke; the hub may retry the case"), exit_code)
    if exit_code in SIGNAL_EXITS:
        return RunOutcome(None, Failure(
            reason=FailureReason.KILLED, exit_code=exit_code, log_tail=log_tail(),
            detail=f"the container was stopped by {SIGNAL_EXITS[exit_code]} from outside the "
                   "spoke (not by its time or memory limit), e.g. `docker kill` or an engine "
                   "restart; the hub may retry the case"), exit_code)
    if exit_code != ExitCode.SUCCESS and settings.output_quota_mb and output_quota.is_full(
            out_dir):
        return RunOutcome(None, Failure(
            reason=FailureReason.OUTPUT_QUOTA, exit_code=exit_code, log_tail=log_tail(),
            detail=f"the algorithm filled its output folder, the site's quota of "
                   f"{settings.output_quota_mb} MiB, and exited with status {exit_code}"),
            exit_code)
    if exit_code != ExitCode.SUCCESS:
        reason = {ExitCode.INVALID_ARGUMENTS: FailureReason.INVALID_ARGUMENTS,
                  ExitCode.UNSUITABLE_INPUT: FailureReason.UNSUITABLE_INPUT}.get(
                      exit_code, FailureReason.EXIT_CODE)  # type: ignore[call-overload]
        return RunOutcome(None, Failure(reason=reason, exit_code=exit_code, log_tail=log_tail(),
                                        detail=f"algorithm exited with status {exit_code}"),
                          exit_code)
    try:
        output = read_output(out_dir / Path(OUTPUT_PATH).name, max_output_bytes)
    except OutputError as exc:
        return RunOutcome(None, Failure(reason=exc.reason, detail=exc.detail, exit_code=0,
                                        log_tail=log_tail()), 0)
    return RunOutcome(output, None, 0)


def _wait(container: Any, timeout_seconds: float, progress_file: Path,
          on_progress: Callable[[Progress], None] | None,
          cancel: threading.Event | None) -> int | str:
    """Wait for the container to exit, checking every :data:`POLL_SECONDS` for progress and
    cancellation. Returns its exit status, or "timeout" / "cancelled"."""
    deadline = time.monotonic() + timeout_seconds
    last: Progress | None = None
    while True:
        if cancel is not None and cancel.is_set():
            return "cancelled"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        try:
            status = container.wait(timeout=min(POLL_SECONDS, remaining))
            return int(status.get("StatusCode", -1))
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            pass
        if on_progress is not None:
            progress = read_progress(progress_file)
            if progress is not None and progress != last:
                last = progress
                on_progress(progress)


def _log_tail(container: Any, lines: int) -> str:
    try:
        raw = container.logs(tail=lines)
    except docker.errors.APIError:
        return ""
    return cut_log_tail(raw)


def cut_log_tail(raw: bytes) -> str:
    """The end of a container's log as it may leave the spoke: at most
    :data:`LOG_TAIL_MAX_BYTES` bytes of UTF-8 (counted in bytes, not characters, so
    multi-byte characters cannot stretch it)."""
    text = raw.decode("utf-8", errors="replace").encode("utf-8")[-LOG_TAIL_MAX_BYTES:]
    return text.decode("utf-8", errors="ignore")


def remove_container(client: docker.DockerClient, name: str) -> None:
    """Remove the container called ``name`` if there is one: one API call, by name."""
    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_container(name, force=True)


def remove_orphans(client: docker.DockerClient, spoke_id: str,
                   runs_dir: Path | None = None) -> list[dict[str, str]]:
    """Remove every container, running or not, that this spoke started, and unmount the
    output folders left below ``runs_dir``. Called at start-up, when none of them can still
    be ours to wait for: a spoke killed mid-case leaves its container and its output tmpfs
    behind. Returns the labels of each removed container (for the audit log)."""
    if runs_dir is not None:
        output_quota.unmount_under(runs_dir)
    removed = []
    mine = {"label": f"{SPOKE_LABEL}={spoke_id}"}
    for container in client.containers.list(all=True, filters=mine, ignore_removed=True):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
            removed.append({"name": container.name, "id": container.id,
                            **(container.labels or {})})
    return removed
