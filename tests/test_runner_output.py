"""The spoke reads back only a small, regular, JSON-object output.json."""

import json
import os
from pathlib import Path

import pytest

from tributary.protocol.messages import FailureReason
from tributary.spoke.runner import OutputError, read_output


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
