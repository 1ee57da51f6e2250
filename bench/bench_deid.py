"""De-identification throughput against a baseline in the same process: plain pydicom
read + write of the same files. Prints files per second and the ratio.

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
from tributary.spoke import cohort
from tributary.spoke.deid import deidentified_case
from tributary.spoke.pseudonyms import Pseudonymizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tributary-bench-"))
    try:
        generate_cohort(root / "data", args.cases, seed=5, site="Bench Hospital")
        pseudonyms = Pseudonymizer(b"b" * 32)
        cases = cohort.discover(root / "data", pseudonyms)
        files = [f for c in cases for s in c.series for f in s.files]

        out = root / "plain"
        out.mkdir()
        t0 = time.perf_counter()
        for i, path in enumerate(files):
            pydicom.dcmread(path).save_as(out / f"{i}.dcm")
        baseline = time.perf_counter() - t0

        t0 = time.perf_counter()
        for case in cases:
            deidentified_case(case, root / "work", pseudonyms)
        deid = time.perf_counter() - t0

        t0 = time.perf_counter()
        for case in cases:
            deidentified_case(case, root / "work", pseudonyms)
        reuse = time.perf_counter() - t0

        n = len(files)
        print(f"files: {n} in {len(cases)} cases")
        print(f"baseline read+write : {n / baseline:8.1f} files/s")
        print(f"de-identification   : {n / deid:8.1f} files/s  "
              f"(ratio to baseline {baseline / deid:.2f})")
        print(f"second run (reuse)  : {reuse * 1000:8.1f} ms for all cases")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
