"""The cohort benchmark's quick mode, end to end in its own process (a few seconds): real
PSIs between real journals through the hub's real ingest, vertical rounds with real
Paillier keys, the catalog's LPs. The bench itself stops with an error when a PSI links
other patients than a hash join finds or the vertical model leaves the central one, so a
pass here means the figures it prints are of runs that computed the right thing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench" / "bench_cohorts.py"


def test_quick_mode_runs_and_prints_its_tables_and_summary() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = re.fullmatch(r"cohorts: PSI ([\d.]+) CPU/identifier 10x/1x, vertical ([\d.]+) "
                           r"CPU/row 10x/1x, catalog ([\d.]+) time/cell 10x/1x", lines[-1])
    assert summary, lines[-1]
    assert all(float(x) > 0 for x in summary.groups())
    for title in ("Private set intersection", "Vertical training", "Catalog disclosure control"):
        assert any(line.startswith(title) for line in lines), title
    # Both vertical rows agree with the central model on every prediction.
    vertical = [line.split() for line in lines if re.match(r"\s+\d+\s+3\+2\s", line)]
    assert len(vertical) == 2 and all(row[-2] == "1.000" for row in vertical), vertical
    assert "failed" not in done.stdout
