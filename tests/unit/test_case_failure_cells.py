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
    return str(macro(case))


def test_log_tail_limits_and_discarded_files_are_shown() -> None:
    html = _cells({"reason": "exit_code", "detail": "exited with 3", "exit_code": 3,
                   "log_tail": "Traceback: <boom>", "log_withheld": False,
                   "applied_limits": {"timeout_seconds": 60, "memory_mb": 512, "gpus": None},
                   "discarded_files": [{"name": "scratch.bin", "size_bytes": 42}]})
    assert "exit code 3" in html
    assert "Traceback: &lt;boom&gt;" in html
    assert "memory_mb 512" in html and "timeout_seconds 60" in html and "gpus" not in html
    assert "scratch.bin (42 B)" in html


def test_withheld_log_tail_says_why() -> None:
    html = _cells({"reason": "exit_code", "detail": "exited with 3", "exit_code": 3,
                   "log_tail": None, "log_withheld": True})
    assert "withheld by the site&#39;s policy" in html or "withheld by the site's policy" in html
    assert "<details" not in html
