"""The table cross-check (scripts/crosscheck_ps315.py) reports what differs and only that.

Rows are written in the independent extraction's own format; the real comparison against
its published package is a release step (it downloads the package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from tributary.spoke.deid.options import DeidOptions
from tributary.spoke.deid.profile import action_table

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "crosscheck_ps315.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crosscheck_ps315", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_that_agree_with_our_table_report_no_difference() -> None:
    basic = action_table(DeidOptions()).single
    rows = [
        {"name": "Accession Number", "tag": "(0008,0050)", "id": "00080050",
         "basicProfile": basic[0x00080050]},
        {"name": "Overlay Data", "tag": "(60XX,3000)", "id": "60xx3000",
         "basicProfile": "X", "cleanGraphOpt": "C"},
        {"name": "Private attributes", "tag": "(GGGG,EEEE) WHERE GGGG IS ODD",
         "id": "ggggeeee-where-gggg-is-odd", "basicProfile": "X", "rtnSafePrivOpt": "C"},
    ]
    lines, shared, differ = _script().compare(rows)
    assert (shared, differ) == (5, 0), "\n".join(lines)


def test_a_differing_action_is_named_with_both_values() -> None:
    rows = [{"name": "Institution Name", "tag": "(0008,0080)", "id": "00080080",
             "basicProfile": "K", "rtnInstIdOpt": "K"}]
    lines, shared, differ = _script().compare(rows)
    assert (shared, differ) == (2, 1)
    ours = action_table(DeidOptions()).single[0x00080080]
    assert f"    (0008,0080) Institution Name: ours {ours}, theirs K" in lines
