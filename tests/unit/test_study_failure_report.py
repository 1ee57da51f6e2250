"""`study show/watch` print a failed case's limits, discarded files and log tail, or that
the site withheld the tail."""

from __future__ import annotations

from typing import Any

import pytest

from tributary.cli.study import report_problems


def _report(failure: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    case = {"spoke_id": "s1", "case_id": "c1", "failure": failure}
    problems = report_problems("exp-1", "completed",
                               [{"spoke_id": "s1", "state": "completed", "failed": 1}], [case])
    assert problems == 1
    return " ".join(capsys.readouterr().out.split())


def test_failed_case_details_are_printed(capsys: pytest.CaptureFixture[str]) -> None:
    text = _report({"reason": "exit_code", "detail": "exited with 3", "exit_code": 3,
                    "log_tail": "Traceback: boom",
                    "applied_limits": {"memory_mb": 512, "gpus": None},
                    "discarded_files": [{"name": "scratch.bin", "size_bytes": 42}]}, capsys)
    assert "exit code 3" in text and "Traceback: boom" in text
    assert "memory_mb 512" in text and "scratch.bin (42 B)" in text


def test_withheld_tail_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    text = _report({"reason": "exit_code", "detail": "x", "log_withheld": True}, capsys)
    assert "withheld by the site's policy" in text
