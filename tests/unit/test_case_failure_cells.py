"""A failed case's row shows its exit code, applied limits, discarded files and log tail,
or says that the site's policy withheld the tail."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from tributary.hub.web.pages import templates


def _cells(failure: dict[str, Any]) -> str:
    case = SimpleNamespace(spoke_id="s1", case_id="c1", state="failed", attempt=1,
                           attempts=[1], failure=failure, output=None, note=None)
    macro = templates.env.get_template("_cases.html").module.case_cells
    return str(macro(case, "exp-1"))


def test_log_tail_limits_and_discarded_files_are_shown() -> None:
    html = _cells({"reason": "exit_code", "detail": "exited with 3", "exit_code": 3,
                   "log_tail": "Traceback: <boom>", "log_withheld": False,
                   "applied_limits": {"timeout_seconds": 60, "memory_mb": 512, "gpus": None},
                   "discarded_files": [{"name": "scratch.bin", "size_bytes": 42}]})
    assert "exit code 3" in html
    assert "Traceback: &lt;boom&gt;" in html
    assert "memory_mb 512" in html and "timeout_seconds 60" in html and "gpus" not in html
    assert "scratch.bin (42 B)" in html
    assert 'href="/experiments/exp-1/cases/s1/c1"' in html  # the case's own page


def test_withheld_log_tail_says_why() -> None:
    html = _cells({"reason": "exit_code", "detail": "exited with 3", "exit_code": 3,
                   "log_tail": None, "log_withheld": True})
    assert "withheld by the site&#39;s policy" in html or "withheld by the site's policy" in html
    assert "<details" not in html


def test_failure_diagnostics_are_in_the_results_csv() -> None:
    import csv
    import io

    from tributary.hub.aggregation.report import ResultRow
    from tributary.hub.services.exports import LOG_WITHHELD, results_csv

    failed = {"reason": "exit_code", "detail": "exited with 3", "exit_code": 3,
              "log_tail": "=HYPERLINK(boom)", "applied_limits": {"memory_mb": 512, "gpus": 0},
              "discarded_files": [{"name": "scratch.bin", "size_bytes": 42}]}
    rows = [ResultRow(spoke_id="s1", case_id="c1", state="failed", attempt=1,
                      failure_reason="exit_code", failure=failed),
            ResultRow(spoke_id="s1", case_id="c2", state="failed", attempt=1,
                      failure_reason="exit_code",
                      failure={"reason": "exit_code", "detail": "x", "log_withheld": True}),
            ResultRow(spoke_id="s1", case_id="c3", state="succeeded", attempt=1,
                      output={"a": 1})]
    first, second, third = csv.DictReader(io.StringIO(results_csv(rows)))
    assert first["failure_exit_code"] == "3" and first["failure_detail"] == "exited with 3"
    assert first["failure_applied_limits"] == "gpus=0; memory_mb=512"
    assert first["failure_discarded_files"] == "scratch.bin (42 B)"
    assert first["failure_log_tail"] == "'=HYPERLINK(boom)"  # never run as a formula
    assert second["failure_log_tail"] == LOG_WITHHELD
    assert third["failure_log_tail"] == "" and third["output.a"] == "1"
