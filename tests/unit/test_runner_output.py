"""The spoke reads back only a small, regular, JSON-object output.json."""

import json
import os
from pathlib import Path

import pytest

from tributary.protocol.messages import FailureReason
from tributary.spoke.output_files import Refusal, UnsafeFile, read_bounded
from tributary.spoke.runner import OutputError, read_output, read_progress


def test_reads_a_json_object(tmp_path: Path) -> None:
    (tmp_path / "output.json").write_text(json.dumps({"a": 1}))
    assert read_output(tmp_path / "output.json", 1024) == {"a": 1}


@pytest.mark.parametrize(("content", "reason"), [
    (b"{not json", FailureReason.INVALID_OUTPUT),
    (b"[1, 2]", FailureReason.INVALID_OUTPUT),
    (b"\xff\xfe", FailureReason.INVALID_OUTPUT),
    (b'{"auc": NaN}', FailureReason.INVALID_OUTPUT),
    (b'{"auc": Infinity}', FailureReason.INVALID_OUTPUT),
    (b'{"a": "' + b"x" * 2000 + b'"}', FailureReason.OUTPUT_TOO_LARGE),
])
def test_refuses_bad_output(tmp_path: Path, content: bytes, reason: FailureReason) -> None:
    (tmp_path / "output.json").write_bytes(content)
    with pytest.raises(OutputError) as error:
        read_output(tmp_path / "output.json", 1024)
    assert error.value.reason == reason


def test_missing_output(tmp_path: Path) -> None:
    with pytest.raises(OutputError) as error:
        read_output(tmp_path / "output.json", 1024)
    assert error.value.reason == FailureReason.MISSING_OUTPUT


def test_never_follows_a_symlink_planted_by_the_algorithm(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.json"
    secret.write_text(json.dumps({"password": "hunter2"}))
    os.symlink(secret, tmp_path / "output.json")
    with pytest.raises(OutputError) as error:
        read_output(tmp_path / "output.json", 1024)
    assert error.value.reason == FailureReason.INVALID_OUTPUT


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    import socket

    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    return path


def _sparse(path: Path) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(10 * 1024 * 1024 * 1024)
    return path


@pytest.mark.parametrize(("make", "reason"), [
    (_fifo, FailureReason.INVALID_OUTPUT),
    (_socket, FailureReason.INVALID_OUTPUT),
    (_sparse, FailureReason.OUTPUT_TOO_LARGE),
])
def test_refuses_special_files_without_blocking(tmp_path: Path, make, reason) -> None:
    """A FIFO would block a reader that opens before it checks; this returns at once."""
    path = make(tmp_path / "output.json")
    with pytest.raises(OutputError) as error:
        read_output(path, 1024)
    assert error.value.reason == reason
    assert read_progress(path) is None


def test_refuses_a_device(tmp_path: Path) -> None:
    with pytest.raises(UnsafeFile) as error:
        read_bounded(Path("/dev/zero"), 1024)
    assert error.value.refusal == Refusal.NOT_REGULAR
    assert "character device" in error.value.detail
