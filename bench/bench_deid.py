"""Ingest throughput (screening + de-identification + content-addressed store + catalog)
against a baseline in the same process: plain pydicom read + write of the same files.
Prints files per second in one process and with one worker per CPU, the ratios, and the
cost of a second (no-op) ingest.

    .venv/bin/python bench/bench_deid.py [--cases 10]
"""

from __future__ import annotations

import argparse
import os
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

        def config(work: str, workers: int) -> SpokeConfig:
            return SpokeConfig(spoke_id="bench", data_dir=root / "data", work_dir=root / work,
                               hub_public_key=root / "hub.pub", catalog={"workers": workers})

        t0 = time.perf_counter()
        assert ingest(config("serial", 1)).stored == len(files)
        serial = time.perf_counter() - t0

        workers = max(2, os.cpu_count() or 1)
        t0 = time.perf_counter()
        first = ingest(config("work", workers))
        deid = time.perf_counter() - t0
        assert first.stored == len(files)

        t0 = time.perf_counter()
        second = ingest(config("work", workers))
        reuse = time.perf_counter() - t0
        assert second.stored == 0

        n = len(files)
        print(f"files: {n} in {args.cases} cases")
        print(f"baseline read+write : {n / baseline:8.1f} files/s")
        print(f"ingest, 1 process   : {n / serial:8.1f} files/s  "
              f"(ratio to baseline {baseline / serial:.2f})")
        print(f"ingest, {workers} workers   : {n / deid:8.1f} files/s  "
              f"(ratio to baseline {baseline / deid:.2f}, to 1 process {serial / deid:.2f})")
        print(f"second ingest (no-op): {reuse * 1000:7.1f} ms for all files")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
