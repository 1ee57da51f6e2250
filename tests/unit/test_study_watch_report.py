"""How ``tributary study watch`` ends (issue 15): every refusal and failed case with its
reason in full, and a count the command turns into exit status 1; a clean study is 0."""

from __future__ import annotations

import pytest

from tributary.cli import study


def target(spoke: str, state: str, failed: int = 0, reason: str | None = None) -> dict:
    return {"spoke_id": spoke, "state": state, "failed": failed, "succeeded": 1,
            "case_count": 1 + failed, "reason": reason}


def test_refusals_and_failures_are_printed_in_full(capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    long_reason = "release signature: " + "x" * 600  # never cut short
    failed_case = {"spoke_id": "east", "case_id": "c-1", "failure": {
        "reason": "exit_code", "exit_code": 1, "detail": "algorithm exited with status 1",
        "log_tail": "Traceback (most recent call last):\nValueError: [bad] input"}}
    problems = study.report_problems(
        "exp-1", "completed",
        [target("north", "refused", reason=long_reason), target("east", "completed", 1),
         target("west", "completed")], [failed_case])
    assert problems == 2
    out = capsys.readouterr().out
    assert "1 of 3 spoke(s) did not run it" in out and "1 case(s) failed" in out
    assert f"north refused: {long_reason}" in out.replace("\n", "")
    assert "east case c-1 failed (exit_code, exit code 1): algorithm exited with status 1" in out
    assert "ValueError: [bad] input" in out  # markup-like text shown as it is


def test_a_clean_study_has_no_problem(capsys: pytest.CaptureFixture[str]) -> None:
    assert study.report_problems("exp-2", "completed", [target("north", "completed")], []) == 0
    assert capsys.readouterr().out.strip() == "exp-2 is completed"
