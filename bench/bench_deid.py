"""Ingest throughput (screening + de-identification + content-addressed store + catalog)
against a baseline in the same process: plain pydicom read + write of the same files.
Prints files per second, the ratio, and the cost of a second (no-op) ingest.

    .venv/bin/python bench/bench_deid.py [--cases 10]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pydicom

from tributary.federation import generate_cohort
from tributary.spoke.config import SpokeConfig
from tributary.spoke.ingest import ingest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tributary-bench-"))
    try:
        generate_cohort(root / "data", args.cases, seed=5, site="Bench Hospital")
        files = sorted((root / "data").rglob("*.dcm"))

        out = root / "plain"
        out.mkdir()
        t0 = time.perf_counter()
        for i, path in enumerate(files):
            pydicom.dcmread(path).save_as(out / f"{i}.dcm")
        baseline = time.perf_counter() - t0

        config = SpokeConfig(spoke_id="bench", data_dir=root / "data",
                             work_dir=root / "work", hub_public_key=root / "hub.pub")
        t0 = time.perf_counter()
        first = ingest(config)
        deid = time.perf_counter() - t0
        assert first.stored == len(files)

        t0 = time.perf_counter()
        second = ingest(config)
        reuse = time.perf_counter() - t0
        assert second.stored == 0

        n = len(files)
        print(f"files: {n} in {args.cases} cases")
        print(f"baseline read+write : {n / baseline:8.1f} files/s")
        print(f"ingest (deid+store) : {n / deid:8.1f} files/s  "
              f"(ratio to baseline {baseline / deid:.2f})")
        print(f"second ingest (no-op): {reuse * 1000:7.1f} ms for all files")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
