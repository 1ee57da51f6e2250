"""What lets `tributary spoke ingest` gain from a second process: a worker that never runs
dry while this process is busy (it keeps about a fortieth of a second of work in hand,
not two files), and a start that loads only what ingest needs before the workers fork
(its serial share)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tributary.spoke.deid import DeidOptions
from tributary.spoke.preparing import PreparePool
from tributary.spoke.pseudonyms import Pseudonymizer
from tributary.spoke.store import Excluded, PreparedInstance, Preparer
from tributary.testbed.federation import generate_cohort


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    data = tmp_path_factory.mktemp("parallel") / "data"
    generate_cohort(data, 2, seed=53, site="Parallel General", size=64, slices=24)
    return sorted(data.rglob("*.dcm"))


def test_a_worker_is_kept_supplied_while_this_process_prepares_a_slow_file(
        slices: list[Path], tmp_path: Path) -> None:
    """This process spends half a second on each file it prepares itself (as on a file
    OCR reads). A worker holding only two files would prepare two and wait; kept about
    a fortieth of a second of its own work ahead, it prepares a run of files meanwhile.
    Every file still comes back, in order, prepared once."""
    key = tmp_path / "pseudonym.key"
    staging = tmp_path / "objects"
    staging.mkdir()
    here = Preparer(Pseudonymizer.from_key_file(key), DeidOptions(), staging)
    mine: list[int] = []
    jobs = [(str(path), None) for path in slices]
    index = {job[0]: i for i, job in enumerate(jobs)}

    def slow(job: tuple[str, str | None]) -> PreparedInstance | Excluded:
        mine.append(index[job[0]])
        time.sleep(0.5)
        return here.from_file(Path(job[0]))

    pool = PreparePool(1, key, DeidOptions().model_dump_json(), staging)
    results = list(pool.map(jobs, local=slow))
    assert len(results) == len(jobs)
    assert all(isinstance(r, PreparedInstance) for r in results), results
    uids = [r.instance_uid for r in results if isinstance(r, PreparedInstance)]
    assert len(set(uids)) == len(jobs)  # each file once, in its own place
    assert {Path(r.staged).name for r in results if isinstance(r, PreparedInstance)
            and r.staged} == {p.name for p in staging.glob(".tmp-*")}
    by_worker = [b - a - 1 for a, b in zip(mine, [*mine[1:], len(jobs)], strict=True)]
    assert max(by_worker) >= 4, (mine, by_worker)  # two files in hand: at most 2
    assert len(mine) < len(jobs) // 3, mine


def test_a_fresh_interpreter_worker_speaks_the_same_protocol(slices: list[Path],
                                                              tmp_path: Path) -> None:
    """The agent, which runs other threads, cannot fork: its workers are fresh
    interpreters (``python -m tributary.spoke.prepare_worker``), timed and fed the same
    way."""
    key = tmp_path / "pseudonym.key"
    staging = tmp_path / "objects"
    staging.mkdir()
    jobs = [(str(path), None) for path in slices[:6]]
    pool = PreparePool(1, key, DeidOptions().model_dump_json(), staging, fork=False)
    results = list(pool.map(jobs))
    assert all(isinstance(r, PreparedInstance) for r in results), results
    here = Preparer(Pseudonymizer.from_key_file(key), DeidOptions())
    assert [r.digest for r in results if isinstance(r, PreparedInstance)] == \
        [here.from_file(Path(job[0])).digest for job in jobs]


_PROBE = """
import json, sys
from tributary.cli.app import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps(sorted(m for m in sys.modules if m.startswith(("tributary", "stomp")))))
"""


def test_ingest_starts_without_the_wire_protocol_or_the_broker_client(
        slices: list[Path], tmp_path: Path) -> None:
    """Everything ingest loads before its workers fork is serial: the wire messages (and
    the signing they pull in) and the broker client are for the agent, not for ingest."""
    work = tmp_path / "work"
    config = tmp_path / "spoke.toml"
    config.write_text(f'spoke_id = "start"\ndata_dir = "{slices[0].parent}"\n'
                      f'work_dir = "{work}"\nhub_public_key = "{tmp_path / "hub.pub"}"\n')
    done = subprocess.run([sys.executable, "-c", _PROBE, "spoke", "ingest", "-c", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "tributary.spoke.ingest" in loaded and (work / "catalog.db").exists()
    assert list((work / "store" / "objects").rglob("*.dcm"))  # it did ingest
    for heavy in ("tributary.protocol.messages", "tributary.protocol.broker", "stomp",
                  "tributary.spoke.journal", "tributary.protocol.signing"):
        assert heavy not in loaded, heavy
