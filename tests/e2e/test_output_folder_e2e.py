"""The output folder is the algorithm's only writable place the spoke reads: whatever the
algorithm leaves there (a FIFO, a socket, a symbolic link, a huge sparse file, a folder
filled to the brim) ends the case on time with a reason, and the spoke's own disk is never
touched. Each test runs the real misbehaving container through the spoke's runner."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest

from tributary.protocol.contract import Participant
from tributary.protocol.messages import FailureReason, RunLimits
from tributary.spoke import output_quota
from tributary.spoke.config import RunnerSettings
from tributary.spoke.runner import RunOutcome, run_case

pytestmark = pytest.mark.e2e

#: Generous: today's runner never returns at all when a FIFO blocks it.
GIVE_UP_SECONDS = 60


def _run(image: str, tmp_path: Path, arguments: dict[str, Any], timeout_seconds: int = 60,
         cancel_after: float | None = None, settings: RunnerSettings | None = None,
         ) -> tuple[RunOutcome, float]:
    """Run one case in a thread, so a runner that blocks fails the test instead of hanging
    it; returns the outcome and how long the case took."""
    client = docker.from_env()
    name = f"tributary-test-{uuid.uuid4().hex[:10]}"
    participant = Participant(case_id=f"c-{uuid.uuid4().hex[:16]}", experiment_id="exp-out",
                              series=[])
    cancel = threading.Event()
    progress: list[Any] = []
    result: dict[str, Any] = {}

    def target() -> None:
        result["outcome"] = run_case(
            client, image, name=name, participant=participant, mounts={},
            arguments=arguments,
            limits=RunLimits(timeout_seconds=timeout_seconds, memory_mb=256, cpus=1.0),
            settings=settings or RunnerSettings(), case_dir=tmp_path / "case",
            max_output_bytes=1024 * 1024, labels={}, on_progress=progress.append,
            cancel=cancel)

    began = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    if cancel_after is not None:
        time.sleep(cancel_after)
        cancel.set()
    thread.join(GIVE_UP_SECONDS)
    took = time.monotonic() - began
    if thread.is_alive():
        _unblock(client, name, tmp_path / "case" / "output")
        pytest.fail(f"the runner was still blocked after {GIVE_UP_SECONDS} s")
    return result["outcome"], took


def _unblock(client: docker.DockerClient, name: str, folder: Path) -> None:
    """Let a runner blocked on a FIFO go: stop the container, open each FIFO's other end."""
    with contextlib.suppress(docker.errors.NotFound):
        client.containers.get(name).remove(force=True)
    for entry in folder.iterdir() if folder.is_dir() else ():
        if stat.S_ISFIFO(entry.lstat().st_mode):
            with contextlib.suppress(OSError):
                os.close(os.open(entry, os.O_WRONLY | os.O_NONBLOCK))


def _image(misbehaving_image: tuple[str, str]) -> str:
    return f"{misbehaving_image[0]}@{misbehaving_image[1]}"


@pytest.mark.parametrize(("kind", "reason"), [
    ("fifo", FailureReason.INVALID_OUTPUT),
    ("socket", FailureReason.INVALID_OUTPUT),
    ("symlink", FailureReason.INVALID_OUTPUT),
    ("huge", FailureReason.OUTPUT_TOO_LARGE),
])
def test_planted_output_is_refused_with_a_reason(misbehaving_image: tuple[str, str],
                                                 tmp_path: Path, kind: str,
                                                 reason: FailureReason) -> None:
    outcome, took = _run(_image(misbehaving_image), tmp_path,
                         {"behaviour": "plant", "kind": kind, "at": "output"})
    assert outcome.failure is not None and outcome.output is None
    assert outcome.failure.reason == reason, outcome.failure
    assert outcome.failure.detail
    assert took < 45


@pytest.mark.parametrize("kind", ["fifo", "socket", "symlink", "huge"])
def test_planted_progress_file_still_times_out(misbehaving_image: tuple[str, str],
                                               tmp_path: Path, kind: str) -> None:
    outcome, took = _run(_image(misbehaving_image), tmp_path,
                         {"behaviour": "plant", "kind": kind, "at": "progress",
                          "then": "hang"}, timeout_seconds=6)
    assert outcome.failure is not None
    assert outcome.failure.reason == FailureReason.TIMEOUT, outcome.failure
    assert took < 45


def test_fifo_progress_file_can_still_be_cancelled(misbehaving_image: tuple[str, str],
                                                   tmp_path: Path) -> None:
    outcome, took = _run(_image(misbehaving_image), tmp_path,
                         {"behaviour": "plant", "kind": "fifo", "at": "progress",
                          "then": "hang"}, timeout_seconds=600, cancel_after=6)
    assert outcome.failure is not None
    assert outcome.failure.reason == FailureReason.CANCELLED, outcome.failure
    assert took < 45


def test_output_folder_has_the_site_quota(misbehaving_image: tuple[str, str],
                                         tmp_path: Path) -> None:
    """Writing past the site's quota fails inside the container only: the spoke's disk
    (the folder holding its journal and audit log) gets none of it, and the case fails
    saying why."""
    settings = RunnerSettings(output_quota_mb=8)
    outcome, took = _run(_image(misbehaving_image), tmp_path,
                         {"behaviour": "fill", "mb": 200}, settings=settings)
    assert outcome.failure is not None, outcome
    assert outcome.failure.reason == FailureReason.OUTPUT_QUOTA, outcome.failure
    assert "8 MiB" in outcome.failure.detail
    tail = outcome.failure.log_tail or ""
    assert "No space left on device" in tail
    # The algorithm's own count: it was stopped at the quota, not at 200 MiB. (The
    # machine's free disk space is not compared: other processes share the disk.)
    written = re.search(r"full after (\d+) MiB", tail)
    assert written is not None and int(written.group(1)) <= 8, tail
    assert not (tmp_path / "case" / "output").exists()  # unmounted and removed
    # The file it left is named with its size (never its content) for the developer.
    [discarded] = outcome.failure.discarded_files
    assert discarded.name == "fill.bin" and 0 < discarded.size_bytes <= 8 * 1024 * 1024
    assert took < 60


def test_output_within_the_quota_is_read(misbehaving_image: tuple[str, str],
                                        tmp_path: Path) -> None:
    outcome, _ = _run(_image(misbehaving_image), tmp_path, {"behaviour": "ok"},
                      settings=RunnerSettings(output_quota_mb=8))
    assert outcome.failure is None, outcome.failure
    assert outcome.output is not None and outcome.output["ok"] is True


def test_output_folders_left_mounted_are_unmounted_at_start(tmp_path: Path) -> None:
    """A spoke killed mid-case leaves its output tmpfs mounted; the next start unmounts it
    (before, it held memory until the machine restarted)."""
    folder = tmp_path / "runs" / "exp 1" / "c-1" / "output"
    output_quota.mount(folder, 1)
    try:
        assert os.path.ismount(folder)
        assert output_quota.unmount_under(tmp_path / "runs") == [folder]
        assert not os.path.ismount(folder)
    finally:
        output_quota.unmount(folder)
