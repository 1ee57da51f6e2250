"""Running an algorithm image on local DICOM folders exactly as a spoke would.

Same mounts, same environment, same isolation (no network, read-only root, unprivileged
user, no capabilities, resource limits) and the same checks on ``output.json``: if an
image passes here it behaves the same at a hospital's spoke.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..contract import (
    ALGO_ARG_ENV,
    CONTRACT_VERSION,
    DEFAULT_OUTPUT_LIMIT_BYTES,
    INPUT_ROOT,
    OUTPUT_DIR,
    OUTPUT_PATH,
    PARTICIPANT_PATH,
    SCRATCH_DIR,
    ExitCode,
    describe_exit_code,
)
from ._proc import ToolError, capture

PathLike = Union[str, "os.PathLike[str]"]

#: The unprivileged user every algorithm runs as (``nobody:nogroup`` on Debian).
CONTAINER_USER = (65534, 65534)
#: Only this much of each stream is kept in the result; a runaway container cannot
#: exhaust the caller's memory.
LOG_TAIL_BYTES = 256 * 1024


@dataclass(frozen=True)
class LocalParticipant:
    """A participant JSON for local folders and the bind mounts that make it true."""

    participant: dict[str, Any]
    mounts: tuple[tuple[Path, str], ...]  # (host folder, container path)


@dataclass
class LocalRunResult:
    """The outcome of :func:`run_local`, judged the way a spoke judges it."""

    image: str
    exit_code: int | None
    meaning: str
    timed_out: bool
    oom_killed: bool
    duration_s: float
    stdout: str
    stderr: str
    output: dict[str, Any] | None
    output_error: str | None
    output_problem: str | None  # missing_output, invalid_output or output_too_large
    participant: dict[str, Any]
    arguments: dict[str, Any]
    output_dir: Path | None = None
    warnings: list[str] = field(default_factory=list)
    container: str = ""  # the (removed) container's name, for matching daemon logs

    @property
    def ok(self) -> bool:
        """Success for a spoke: exit 0 in time and a valid ``output.json``."""
        return not self.timed_out and self.exit_code == ExitCode.SUCCESS and self.output is not None

    @property
    def outcome(self) -> str:
        """What a spoke would record, in the spoke's own words: ``success`` or a failure
        reason (timeout, out_of_memory, invalid_arguments, unsuitable_input, exit_code,
        missing_output, invalid_output, output_too_large)."""
        if self.timed_out:
            return "timeout"
        if self.oom_killed:
            return "out_of_memory"
        if self.exit_code == ExitCode.INVALID_ARGUMENTS:
            return "invalid_arguments"
        if self.exit_code == ExitCode.UNSUITABLE_INPUT:
            return "unsuitable_input"
        if self.exit_code != ExitCode.SUCCESS:
            return "exit_code"
        return "success" if self.output is not None else str(self.output_problem)


@dataclass(frozen=True)
class OutputCheck:
    """Result of reading ``output.json`` the way a spoke does."""

    output: dict[str, Any] | None
    problem: str | None = None  # missing_output, invalid_output, output_too_large
    detail: str | None = None


def _pseudonym(prefix: str, kind: str, path: Path) -> str:
    digest = hashlib.sha256(f"{kind}:{path}".encode()).hexdigest()
    return f"{prefix}-{digest[:16]}"


def _visible_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def find_series_dirs(dicom_dir: PathLike) -> list[Path]:
    """Every folder under ``dicom_dir`` (itself included) that directly holds files."""
    root = Path(dicom_dir).resolve()
    if not root.is_dir():
        raise ToolError(f"{dicom_dir} is not a folder")
    found = []
    for current, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if _visible_files(Path(current)):
            found.append(Path(current))
    if not found:
        raise ToolError(f"no files found under {dicom_dir}")
    return found


def _probe(first_file: Path) -> dict[str, Any]:
    """Modality, size and body part from the first file, as the spoke reads them."""
    fallback: dict[str, Any] = {"modality": "OT", "rows": None, "columns": None, "body_part": None}
    try:
        import pydicom
    except ImportError:
        return fallback
    try:
        ds = pydicom.dcmread(str(first_file), stop_before_pixels=True)
    except Exception:  # any unreadable file: the series is just "other"
        return fallback

    def _int(name: str) -> int | None:
        value = ds.get(name)
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    body_part = ds.get("BodyPartExamined")
    return {
        "modality": str(ds.get("Modality") or "OT"),
        "rows": _int("Rows"),
        "columns": _int("Columns"),
        "body_part": str(body_part) if body_part else None,
    }


def build_participant(
    dicom_dir: PathLike, *, experiment_id: str = "local-test"
) -> LocalParticipant:
    """Describe local DICOM folders as a participant JSON with pseudonymous ids.

    Ids are hashes of the resolved folder paths: stable between runs, and the folder
    names (which at a hospital often contain a patient's name) never reach the algorithm.
    """
    root = Path(dicom_dir).resolve()
    return participant_for_series(find_series_dirs(root), _pseudonym("c", "case", root),
                                  experiment_id=experiment_id)


def participant_for_series(
    folders: Sequence[Path], case_id: str, *, experiment_id: str = "local-test"
) -> LocalParticipant:
    """The participant JSON of one case made of these series folders (each mounted at
    ``/tributary/input/series-NNN``), under the pseudonymous ``case_id``."""
    series = []
    mounts = []
    for index, folder in enumerate(folders, start=1):
        files = _visible_files(folder)
        if not files:
            raise ToolError(f"series folder {folder} holds no files")
        container_path = f"{INPUT_ROOT}/series-{index:03d}"
        series.append(
            {
                "series_id": _pseudonym("s", "series", folder),
                **_probe(files[0]),
                "path": container_path,
                "instance_count": len(files),
            }
        )
        mounts.append((folder, container_path))
    participant = {
        "contract_version": CONTRACT_VERSION,
        "case_id": case_id,
        "experiment_id": experiment_id,
        "series": [
            {
                key: item[key]
                for key in (
                    "series_id",
                    "modality",
                    "path",
                    "instance_count",
                    "rows",
                    "columns",
                    "body_part",
                )
            }
            for item in series
        ],
    }
    return LocalParticipant(participant=participant, mounts=tuple(mounts))


def validate_output_file(
    path: PathLike, limit_bytes: int = DEFAULT_OUTPUT_LIMIT_BYTES
) -> OutputCheck:
    """Read ``output.json`` as a spoke does: a JSON object, or the reason it is refused.

    The file is opened without following symlinks: a container could otherwise plant a
    link pointing at a host file and have the host read it back as its "output". NaN and
    Infinity are refused too: they are not JSON, and strict consumers choke on them.
    """
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return OutputCheck(None, "missing_output", "no output.json was written")
    except OSError as exc:
        return OutputCheck(None, "invalid_output", f"output.json cannot be opened safely: {exc}")
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            return OutputCheck(None, "invalid_output", "output.json is not a regular file")
        if info.st_size > limit_bytes:
            return OutputCheck(
                None,
                "output_too_large",
                f"output.json is {info.st_size} bytes, over the {limit_bytes} byte limit",
            )
        data = handle.read(limit_bytes + 1)
    if len(data) > limit_bytes:
        return OutputCheck(
            None, "output_too_large", f"output.json is over the {limit_bytes} byte limit"
        )

    def _reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        return OutputCheck(None, "invalid_output", f"output.json is not valid JSON: {exc}")
    if not isinstance(value, dict):
        return OutputCheck(
            None,
            "invalid_output",
            f"output.json must hold a JSON object, not {type(value).__name__}",
        )
    return OutputCheck(value)


def _mount(source: Path, target: str, read_only: bool) -> str:
    """A ``--mount`` spec; docker parses it as CSV, so awkward paths are quoted."""

    def field(key: str, value: str) -> str:
        if any(c in value for c in ',"\n'):
            return '"' + f"{key}={value}".replace('"', '""') + '"'
        return f"{key}={value}"

    spec = f"type=bind,{field('source', str(source))},{field('target', target)}"
    return spec + (",readonly" if read_only else "")


def _prepare_output_dir(output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    stale = output_dir / "output.json"
    if stale.is_symlink() or stale.exists():
        stale.unlink()  # never mistake a previous run's answer for this run's
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        os.chown(output_dir, *CONTAINER_USER)
        os.chmod(output_dir, 0o755)
    else:
        os.chmod(output_dir, 0o777)


def _tail_file(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - LOG_TAIL_BYTES))
        data = handle.read()
    text = data.decode("utf-8", errors="replace")
    return text if size <= LOG_TAIL_BYTES else "…" + text


def _unreadable(folder: Path) -> list[str]:
    """Files the container user could not read (the spoke's copies are world-readable)."""
    return [str(p) for p in _visible_files(folder) if not p.stat().st_mode & stat.S_IROTH]


@dataclass(frozen=True)
class SandboxRun:
    """How a container run in the spoke's sandbox ended."""

    exit_code: int
    oom_killed: bool
    timed_out: bool
    duration_s: float
    stdout: str
    stderr: str


def run_sandboxed(
    image: str,
    mounts: Sequence[tuple[Path, str, bool]],
    algo_arg: str,
    workdir: Path,
    *,
    name: str,
    timeout: float = 3600.0,
    memory_mb: int = 2048,
    cpus: float = 1.0,
    pids_limit: int = 256,
    tmpfs_mb: int = 512,
    docker: str = "docker",
) -> SandboxRun:
    """Run ``image`` with ``mounts`` ((host, container path, read-only)) and ``ALGO_ARG``
    in the spoke's sandbox; logs go through ``workdir``. The caller removes the container
    (``docker rm --force name``)."""
    # The same sandbox as the spoke's runner: keep these in step with spoke/runner.py.
    options = {
        "--name": name,
        "--network": "none",
        "--tmpfs": f"{SCRATCH_DIR}:rw,noexec,nosuid,size={tmpfs_mb}m",
        "--workdir": SCRATCH_DIR,
        "--user": f"{CONTAINER_USER[0]}:{CONTAINER_USER[1]}",
        "--cap-drop": "ALL",
        "--security-opt": "no-new-privileges",
        "--memory": f"{memory_mb}m",
        "--memory-swap": f"{memory_mb}m",  # equal to --memory: no swap
        "--cpus": str(cpus),
        "--pids-limit": str(pids_limit),
        "--env": ALGO_ARG_ENV,  # the value comes from the environment, not argv
    }
    # --pull never: test the local image, and never reach out to a registry for it.
    cmd = [docker, "run", "--pull", "never", "--read-only"]
    for option, value in options.items():
        cmd += [option, value]
    for host, target, read_only in mounts:
        cmd += ["--mount", _mount(host, target, read_only)]
    cmd.append(image)
    env = dict(os.environ, **{ALGO_ARG_ENV: algo_arg})
    stdout_path, stderr_path = workdir / "stdout", workdir / "stderr"
    timed_out = False
    started = time.monotonic()
    with open(stdout_path, "wb") as out_f, open(stderr_path, "wb") as err_f:
        try:
            proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env)
        except FileNotFoundError as exc:
            raise ToolError(f"{docker!r} is not installed or not on PATH") from exc
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            subprocess.run([docker, "kill", name], capture_output=True, check=False)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    duration = time.monotonic() - started
    stdout, stderr = _tail_file(stdout_path), _tail_file(stderr_path)
    try:
        state = json.loads(capture([docker, "inspect", "--format", "{{json .State}}", name]))
    except ToolError as exc:  # the container was never created (bad image name, …)
        raise ToolError(
            f"docker run failed before the container started (exit {proc.returncode}):\n"
            f"{stderr.strip()}"
        ) from exc
    return SandboxRun(exit_code=int(state.get("ExitCode", proc.returncode)),
                      oom_killed=bool(state.get("OOMKilled")), timed_out=timed_out,
                      duration_s=round(duration, 3), stdout=stdout, stderr=stderr)


def run_local(
    image: str,
    dicom_dir: PathLike,
    *,
    arguments: Mapping[str, Any] | None = None,
    output_dir: PathLike | None = None,
    timeout: float = 3600.0,
    memory_mb: int = 2048,
    cpus: float = 1.0,
    pids_limit: int = 256,
    tmpfs_mb: int = 512,
    output_limit_bytes: int = DEFAULT_OUTPUT_LIMIT_BYTES,
    experiment_id: str = "local-test",
    docker: str = "docker",
) -> LocalRunResult:
    """Run ``image`` on the series under ``dicom_dir`` as a spoke would, and judge it.

    ``output_dir`` keeps ``output.json`` (a previous one there is removed first); without
    it a temporary folder is used and removed. The container is killed after ``timeout``
    seconds and always removed afterwards.
    """
    return run_participant(
        image,
        build_participant(dicom_dir, experiment_id=experiment_id),
        arguments=arguments,
        output_dir=output_dir,
        timeout=timeout,
        memory_mb=memory_mb,
        cpus=cpus,
        pids_limit=pids_limit,
        tmpfs_mb=tmpfs_mb,
        output_limit_bytes=output_limit_bytes,
        docker=docker,
    )


def run_participant(
    image: str,
    local: LocalParticipant,
    *,
    arguments: Mapping[str, Any] | None = None,
    output_dir: PathLike | None = None,
    timeout: float = 3600.0,
    memory_mb: int = 2048,
    cpus: float = 1.0,
    pids_limit: int = 256,
    tmpfs_mb: int = 512,
    output_limit_bytes: int = DEFAULT_OUTPUT_LIMIT_BYTES,
    docker: str = "docker",
) -> LocalRunResult:
    """Run ``image`` on one prepared case (:func:`build_participant`,
    :func:`participant_for_series`) in the spoke's sandbox, and judge it like a spoke."""
    args_obj = dict(arguments or {})
    algo_arg = {
        "contract_version": CONTRACT_VERSION,
        "arguments": args_obj,
        "participant": PARTICIPANT_PATH,
        "output": OUTPUT_PATH,
    }
    warnings = []
    for folder, _ in local.mounts:
        unreadable = _unreadable(folder)
        if unreadable:
            warnings.append(
                f"{len(unreadable)} file(s) in {folder} are not world-readable; "
                f"the container user {CONTAINER_USER[0]} cannot read them"
            )
    workdir = Path(tempfile.mkdtemp(prefix="tributary-run-"))
    keep_output = output_dir is not None
    out = Path(output_dir).resolve() if keep_output else workdir / "output"
    name = f"tributary-test-{uuid.uuid4().hex[:12]}"
    try:
        participant_file = workdir / "participant.json"
        participant_file.write_text(json.dumps(local.participant, indent=2))
        os.chmod(participant_file, 0o644)
        _prepare_output_dir(out)
        mounts = [(participant_file, PARTICIPANT_PATH, True)]
        mounts += [(host, target, True) for host, target in local.mounts]
        mounts.append((out, OUTPUT_DIR, False))
        run = run_sandboxed(image, mounts, json.dumps(algo_arg), workdir, name=name,
                            timeout=timeout, memory_mb=memory_mb, cpus=cpus,
                            pids_limit=pids_limit, tmpfs_mb=tmpfs_mb, docker=docker)
        timed_out, duration, stdout, stderr = (run.timed_out, run.duration_s, run.stdout,
                                               run.stderr)
        exit_code, oom = run.exit_code, run.oom_killed
        check = validate_output_file(out / "output.json", output_limit_bytes)
        if timed_out:
            meaning = f"timeout: killed after {timeout:g} s"
        elif oom:
            meaning = "error (killed: out of memory)"
        else:
            meaning = describe_exit_code(exit_code)
        return LocalRunResult(
            image=image,
            exit_code=exit_code,
            meaning=meaning,
            timed_out=timed_out,
            oom_killed=oom,
            duration_s=duration,
            stdout=stdout,
            stderr=stderr,
            output=check.output,
            output_error=check.detail,
            output_problem=check.problem,
            participant=local.participant,
            arguments=args_obj,
            output_dir=out if keep_output else None,
            warnings=warnings,
            container=name,
        )
    finally:
        subprocess.run([docker, "rm", "--force", name], capture_output=True, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def print_result(result: LocalRunResult, file: Any = None) -> None:
    """Human-readable report of a local run (what the CLI prints)."""
    file = file or sys.stdout
    for warning in result.warnings:
        print(f"warning: {warning}", file=file)
    print(
        f"exit code: {result.exit_code} ({result.meaning}) after {result.duration_s:.1f} s",
        file=file,
    )
    if result.stderr.strip():
        print("--- stderr ---", file=file)
        print(result.stderr.rstrip(), file=file)
    if result.stdout.strip():
        print("--- stdout ---", file=file)
        print(result.stdout.rstrip(), file=file)
    print("--- output.json ---", file=file)
    if result.output is not None:
        print(json.dumps(result.output, indent=2), file=file)
    else:
        print(f"invalid: {result.output_error}", file=file)
    print(f"outcome: {result.outcome}", file=file)  # the spoke's word for it


def prepare_local_debug(
    dicom_dir: PathLike,
    workdir: PathLike,
    *,
    arguments: Mapping[str, Any] | None = None,
    experiment_id: str = "local-debug",
) -> str:
    """Set up an ALGO_ARG for running an algorithm *without* a container, and return it.

    Writes ``workdir/participant.json`` whose series paths are the local folders, and
    points the output at ``workdir/output/output.json``. Export the returned JSON as
    ``ALGO_ARG`` and run the algorithm's script directly (or pass it to ``load_context``)
    to debug it with ordinary tools. No isolation applies: use :func:`run_local` to check
    the real container.
    """
    local = build_participant(dicom_dir, experiment_id=experiment_id)
    by_container_path = {target: str(host) for host, target in local.mounts}
    participant = dict(local.participant)
    participant["series"] = [
        {**item, "path": by_container_path[item["path"]]} for item in participant["series"]
    ]
    work = Path(workdir).resolve()
    (work / "output").mkdir(parents=True, exist_ok=True)
    participant_file = work / "participant.json"
    participant_file.write_text(json.dumps(participant, indent=2))
    return json.dumps(
        {
            "contract_version": CONTRACT_VERSION,
            "arguments": dict(arguments or {}),
            "participant": str(participant_file),
            "output": str(work / "output" / "output.json"),
        }
    )
