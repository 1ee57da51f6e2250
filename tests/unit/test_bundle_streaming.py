"""The study bundle is written from a stream of cases read a chunk at a time: its memory
does not grow with the study (30,000 results with their custody records would otherwise be
held at once), and what it writes is the same bundle."""

from __future__ import annotations

import json
import multiprocessing
import tracemalloc
from pathlib import Path

from sqlalchemy import insert
from sqlmodel import Session

from tributary.hub.db import make_engine
from tributary.hub.models import (
    Algorithm,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    Spoke,
    utcnow,
)
from tributary.hub.services.exports import iter_bundle_cases
from tributary.protocol.bundle import verify_bundle, write_bundle
from tributary.protocol.signing import SigningKey

PADDING = "x" * 8000  # about a real custody record's size, a little more


def _study(tmp: Path, cases: int) -> str:
    url = f"sqlite:///{tmp / f'hub-{cases}.db'}"
    engine = make_engine(url)
    now = utcnow()
    with Session(engine) as session:
        session.add(Algorithm(id=1, name="a", version="1", repository="r/a",
                              digest="sha256:" + "0" * 64))
        for spoke in ("north", "south"):
            session.add(Spoke(id=spoke, name=spoke))
        session.flush()
        session.add(Experiment(id="exp", name="bundle", algorithm_id=1,
                               state=ExperimentState.COMPLETED, aggregator="summary"))
        session.commit()
        session.execute(insert(CaseResult), [dict(
            experiment_id="exp", spoke_id=("north", "south")[n % 2], case_id=f"c{n:05d}",
            state=CaseState.SUCCEEDED if n % 10 else CaseState.QUEUED, attempt=1,
            received_at=now, output={"score": n}, released={},
            custody={"record": n, "padding": PADDING} if n % 10 else None)
            for n in range(cases)])
        session.commit()
    engine.dispose()
    return url


def _peak(tmp: Path, url: str, cases: int, key_file: Path) -> tuple[int, Path]:
    """Peak traced memory while writing the bundle, in a process of its own (tracemalloc
    counts every thread, and other tests may leave threads behind)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_write, (tmp, url, cases, key_file))


def _write(tmp: Path, url: str, cases: int, key_file: Path) -> tuple[int, Path]:
    engine = make_engine(url, migrate=False)
    key = SigningKey.load(key_file)
    counted: list[int] = []
    tracemalloc.start()
    try:
        out = write_bundle(tmp / f"bundle-{cases}", {"id": "exp", "name": "bundle"},
                           iter_bundle_cases(engine, "exp", counted), key)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        engine.dispose()
    assert counted == [cases - cases // 10]
    return peak, out


def test_the_bundle_streams_with_flat_memory(tmp_path: Path) -> None:
    small, large = 600, 3000
    key = SigningKey.generate()
    key.save(tmp_path / "hub.key")
    peak_small, _ = _peak(tmp_path, _study(tmp_path, small), small, tmp_path / "hub.key")
    peak_large, out = _peak(tmp_path, _study(tmp_path, large), large, tmp_path / "hub.key")
    held = large * len(PADDING) * 9 // 10  # what loading every row would hold, at least
    assert peak_large < held / 2, (peak_small, peak_large, held)
    # What grows is ids, manifest lines and crate entries: far less than a row per case.
    per_case = (peak_large - peak_small) / (large - small)
    assert per_case < len(PADDING) / 3, (peak_small, peak_large, per_case)
    # The same bundle as before: every result and its custody record, the others named.
    experiment = json.loads((out / "experiment.json").read_text())
    assert sum(len(v) for v in experiment["expected_results"].values()) == large * 9 // 10
    assert experiment["expected_results"]["north"] == sorted(
        experiment["expected_results"]["north"])
    assert sum(len(v) for v in experiment["cases_without_result"].values()) == large // 10
    assert len(list((out / "results").rglob("*.custody.dsse.json"))) == large * 9 // 10
    crate = json.loads((out / "ro-crate-metadata.json").read_text())
    ids = {part["@id"] for part in crate["@graph"]}
    assert "results/north/c00002.json" in ids and "results/south/c00003.custody.dsse.json" in ids
    assert len(crate["@graph"][1]["hasPart"]) == 1 + 2 * (large * 9 // 10)
    # Its manifest covers every file and carries the hub's signature.
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "hub.pub").write_text(key.public.pem)
    problems = verify_bundle(out, keys).problems
    assert not [p for p in problems if "manifest" in p], problems[:5]
