"""A failed case names the files its algorithm left in the output folder besides
output.json and progress.json: names (made safe to show) and sizes only, bounded."""

import os
import socket
from pathlib import Path

from tributary.protocol.messages import (
    DISCARDED_NAME_MAX_CHARS,
    MAX_DISCARDED_FILES,
    Failure,
    FailureReason,
    RunLimits,
)
from tributary.spoke.config import RunnerSettings
from tributary.spoke.output_files import leftover_files
from tributary.spoke.runner import classify

KEEP = {"output.json", "progress.json"}


def _failed(out_dir: Path) -> Failure:
    outcome = classify(1, False, lambda: "boom", out_dir, RunLimits(),
                       RunnerSettings(output_quota_mb=0), 1024)
    assert outcome.failure is not None
    return outcome.failure


def test_lists_what_is_left_besides_output_and_progress(tmp_path: Path) -> None:
    (tmp_path / "output.json").write_text("{}")
    (tmp_path / "progress.json").write_text("{}")
    (tmp_path / "model.pt").write_bytes(b"x" * 1234)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "roc.png").write_bytes(b"p" * 10)
    os.symlink("/etc/passwd", tmp_path / "link")
    os.mkfifo(tmp_path / "pipe")
    failure = _failed(tmp_path)
    assert failure.reason == FailureReason.EXIT_CODE
    listed = {f.name: f.size_bytes for f in failure.discarded_files}
    assert listed == {"model.pt": 1234, "plots/roc.png": 10,
                      "link (a symbolic link)": 0, "pipe (a named pipe)": 0}


def test_a_success_lists_nothing(tmp_path: Path) -> None:
    (tmp_path / "output.json").write_text('{"a": 1}')
    (tmp_path / "extra.bin").write_bytes(b"x")
    outcome = classify(0, False, lambda: "", tmp_path, RunLimits(),
                       RunnerSettings(output_quota_mb=0), 1024)
    assert outcome.failure is None and outcome.output == {"a": 1}


def test_names_are_made_safe_and_cut(tmp_path: Path) -> None:
    (tmp_path / "evil\x1b[31mred\nforged line").write_bytes(b"")
    (tmp_path / ("n" * 255)).write_bytes(b"")
    names = [f.name for f in _failed(tmp_path).discarded_files]
    assert "evil?[31mred?forged line" in names
    assert all(len(n) <= DISCARDED_NAME_MAX_CHARS and n.isprintable() for n in names)


def test_many_files_are_summed_up_in_one_line(tmp_path: Path) -> None:
    for i in range(300):
        (tmp_path / f"f{i:04d}").write_bytes(b"x" * 2)
    files = _failed(tmp_path).discarded_files
    assert len(files) == MAX_DISCARDED_FILES
    last = files[-1]
    assert last.name == f"({300 - MAX_DISCARDED_FILES + 1} more entries not listed)"
    assert last.size_bytes == 2 * (300 - MAX_DISCARDED_FILES + 1)


def test_a_socket_and_a_missing_folder_never_raise(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s"))
        assert leftover_files(tmp_path, KEEP, 10, 255) == [("s (a socket)", 0)]
    finally:
        sock.close()
    assert leftover_files(tmp_path / "gone", KEEP, 10, 255) == []
