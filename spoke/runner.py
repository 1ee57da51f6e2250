"""Running one case in an isolated container: no network, read-only root and inputs,
all capabilities dropped, an unprivileged user, memory, CPU, process and time limits.
Only ``output.json`` is read back, and only if it is a small regular JSON object."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions

from tributary.protocol.contract import (
    ALGO_ARG_ENV,
    OUTPUT_DIR,
    OUTPUT_PATH,
    PARTICIPANT_PATH,
    AlgoArg,
    ExitCode,
    Participant,
)
from tributary.protocol.messages import Failure, FailureReason, RunLimits
from tributary.spoke.config import RunnerSettings

#: The uid:gid algorithms run as ("nobody").
ALGORITHM_USER = "65534:65534"
LABEL = "org.tributary.case"


@dataclass(frozen=True)
class RunOutcome:
    output: dict[str, Any] | None
    failure: Failure | None
    exit_code: int | None


def effective_limits(asked: RunLimits, site: RunnerSettings) -> RunLimits:
    """The experiment's limits, capped by what the site allows."""
    return RunLimits(timeout_seconds=min(asked.timeout_seconds, site.max_timeout_seconds),
                     memory_mb=min(asked.memory_mb, site.max_memory_mb),
                     cpus=min(asked.cpus, site.max_cpus))


def read_output(path: Path, limit: int) -> dict[str, Any]:
    """Read output.json without following links, refusing anything but a small object."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise OutputError(FailureReason.MISSING_OUTPUT,
                          "the algorithm wrote no output.json") from None
    except OSError as exc:
        raise OutputError(FailureReason.INVALID_OUTPUT,
                          f"output.json unreadable: {exc}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OutputError(FailureReason.INVALID_OUTPUT, "output.json is not a regular file")
        if info.st_size > limit:
            raise OutputError(FailureReason.OUTPUT_TOO_LARGE,
                              f"output.json is {info.st_size} bytes; the limit is {limit}")
        raw = handle.read(limit + 1)
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise OutputError(FailureReason.INVALID_OUTPUT,
                          f"output.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OutputError(FailureReason.INVALID_OUTPUT,
                          f"output.json must be a JSON object, not {type(data).__name__}")
    return data


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


class OutputError(Exception):
    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def run_case(client: docker.DockerClient, image: str, name: str, participant: Participant,
             mounts: dict[str, Path], arguments: dict[str, Any], limits: RunLimits,
             settings: RunnerSettings, case_dir: Path, max_output_bytes: int,
             labels: dict[str, str],
             on_started: Callable[[str], None] | None = None) -> RunOutcome:
    """Run one case to completion and classify what happened. ``on_started`` is told the
    container's id once it runs (for the audit log)."""
    if case_dir.exists():
        shutil.rmtree(case_dir)
    out_dir = case_dir / "output"
    out_dir.mkdir(parents=True)
    os.chown(out_dir, 65534, 65534) if os.geteuid() == 0 else out_dir.chmod(0o777)
    participant_file = case_dir / "participant.json"
    participant_file.write_text(participant.model_dump_json(indent=2))
    participant_file.chmod(0o644)
    volumes = {str(participant_file): {"bind": PARTICIPANT_PATH, "mode": "ro"},
               str(out_dir): {"bind": OUTPUT_DIR, "mode": "rw"}}
    volumes.update({str(host): {"bind": path, "mode": "ro"} for path, host in mounts.items()})
    algo_arg = AlgoArg(arguments=arguments).model_dump_json()
    remove_container(client, name)
    container = client.containers.run(
        image, name=name, detach=True, environment={ALGO_ARG_ENV: algo_arg},
        network_mode="none", read_only=True, user=ALGORITHM_USER, cap_drop=["ALL"],
        security_opt=["no-new-privileges"], pids_limit=settings.pids_limit,
        mem_limit=f"{limits.memory_mb}m", memswap_limit=f"{limits.memory_mb}m",
        nano_cpus=int(limits.cpus * 1e9),
        tmpfs={"/tmp": f"rw,noexec,nosuid,size={settings.tmpfs_mb}m"},
        volumes=volumes, labels={LABEL: name, **labels}, working_dir="/tmp",
    )
    try:
        if on_started is not None:
            on_started(container.id)
        try:
            status = container.wait(timeout=limits.timeout_seconds)
            exit_code: int | None = int(status.get("StatusCode", -1))
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            container.kill()
            container.wait(timeout=30)
            return RunOutcome(None, Failure(
                reason=FailureReason.TIMEOUT,
                detail=f"no result within {limits.timeout_seconds} s; container killed",
                log_tail=_log_tail(container, settings.log_tail_lines)), None)
        container.reload()
        oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
        tail = _log_tail(container, settings.log_tail_lines)
    finally:
        remove_container(client, name)
    if oom:
        return RunOutcome(None, Failure(reason=FailureReason.OUT_OF_MEMORY, exit_code=exit_code,
                                        detail=f"killed at the {limits.memory_mb} MiB limit",
                                        log_tail=tail), exit_code)
    if exit_code != ExitCode.SUCCESS:
        reason = {ExitCode.INVALID_ARGUMENTS: FailureReason.INVALID_ARGUMENTS,
                  ExitCode.UNSUITABLE_INPUT: FailureReason.UNSUITABLE_INPUT}.get(
                      exit_code, FailureReason.EXIT_CODE)  # type: ignore[call-overload]
        return RunOutcome(None, Failure(reason=reason, exit_code=exit_code, log_tail=tail,
                                        detail=f"algorithm exited with status {exit_code}"),
                          exit_code)
    try:
        output = read_output(out_dir / Path(OUTPUT_PATH).name, max_output_bytes)
    except OutputError as exc:
        return RunOutcome(None, Failure(reason=exc.reason, detail=exc.detail, exit_code=0,
                                        log_tail=tail), 0)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return RunOutcome(output, None, 0)


def _log_tail(container: Any, lines: int) -> str:
    try:
        text = container.logs(tail=lines).decode("utf-8", errors="replace")
    except docker.errors.APIError:
        return ""
    return text[-8000:]


def remove_container(client: docker.DockerClient, name: str) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        client.containers.get(name).remove(force=True)
