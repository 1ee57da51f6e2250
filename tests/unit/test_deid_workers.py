"""``tributary spoke deidentify`` on several processes: the same files, bytes and report
as one process; a file that breaks pydicom's writer and a worker killed mid-run end as
exclusions with their reasons, and the report matches what is on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from child_processes import WorkerKiller
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.spoke import folder_deid
from tributary.spoke.deid import DeidOptions, Screener
from tributary.spoke.folder_deid import FolderRun, prepared
from tributary.spoke.preparing import FOLDER_TASK, PreparePool
from tributary.spoke.pseudonyms import Pseudonymizer
from tributary.spoke.store import Excluded
from tributary.testbed.federation import generate_cohort

#: Read by pydicom, refused by its writer (a TypeError on (0008,0060)).
BROKEN = "SC_rgb_jpeg.dcm"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deid-workers")
    data = root / "src"
    generate_cohort(data / "ct", 3, seed=41, site="Worker General", size=64, slices=30)
    (data / "ct" / "attributes.csv").unlink()
    (data / "ct" / "ground_truth.json").unlink(missing_ok=True)
    shutil.copy(get_testdata_file(BROKEN), data / BROKEN)
    (data / "notes.txt").write_text("not an image")
    # a DICOM preamble and header that stop in the middle of an element
    head = Path(get_testdata_file("CT_small.dcm")).read_bytes()[:700]
    (data / "cut.dcm").write_bytes(head)
    # one slice twice under another name: the second is the same instance
    first = sorted((data / "ct").rglob("*.dcm"))[0]
    shutil.copy(first, data / "x-copy-of-a-slice.dcm")
    (root / "key").write_bytes(os.urandom(32))
    return data


def _deidentify(src: Path, dst: Path, workers: int) -> dict:
    report = dst.with_name(dst.name + ".json")
    result = CliRunner().invoke(app, ["spoke", "deidentify", str(src), str(dst), "--key",
                                      str(src.parent / "key"), "--report", str(report),
                                      "--workers", str(workers)])
    assert result.exit_code == 0, result.output
    return json.loads(report.read_text())


def _files(dst: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dst)): p.read_bytes() for p in dst.rglob("*") if p.is_file()}


def _assert_report_matches_disk(report: dict, dst: Path, inputs: int) -> None:
    on_disk = _files(dst)
    assert sorted(o["output"] for o in report["outputs"]) == sorted(on_disk)
    assert report["files_seen"] == inputs
    assert report["files_written"] + report["excluded"] == inputs
    verdicts = report["screening"]["files"]
    assert len(verdicts) == inputs  # every input has its verdict
    assert all(v["findings"] for v in verdicts if v["status"] == "excluded")
    assert not (dst / folder_deid.STAGING).exists()


def _same(one: dict, two: dict) -> None:
    for field in ("started", "finished", "destination"):
        one.pop(field), two.pop(field)
    assert one == two


def test_two_workers_write_the_files_and_report_one_process_does(
        corpus: Path, tmp_path: Path) -> None:
    inputs = sum(1 for p in corpus.rglob("*") if p.is_file())
    assert inputs >= folder_deid.PARALLEL_MIN  # so two workers really run
    one = _deidentify(corpus, tmp_path / "one", 1)
    two = _deidentify(corpus, tmp_path / "two", 2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")  # names and bytes
    _assert_report_matches_disk(two, tmp_path / "two", inputs)
    by_path = {Path(v["path"]).name: v for v in two["screening"]["files"]}
    broken = by_path[BROKEN]
    assert broken["status"] == "excluded"
    failed = [f for f in broken["findings"] if f["reason"] == "deidentification-failed"]
    assert failed and failed[0]["detail"].startswith("TypeError"), broken["findings"]
    assert by_path["cut.dcm"]["status"] == "excluded"
    assert by_path["notes.txt"]["findings"][0]["reason"] == "not-dicom"
    assert by_path["x-copy-of-a-slice.dcm"]["findings"][0]["reason"] in (
        "duplicate-instance", "duplicate-pixels")
    _same(one, two)


def test_running_again_into_the_same_folder_changes_nothing(
        corpus: Path, tmp_path: Path) -> None:
    first = _deidentify(corpus, tmp_path / "out", 2)
    before = _files(tmp_path / "out")
    again = _deidentify(corpus, tmp_path / "out", 2)
    assert _files(tmp_path / "out") == before
    _same(first, again)


def _run(corpus: Path, dst: Path, workers: int, after_each=None) -> FolderRun:
    key = corpus.parent / "key"
    options = DeidOptions()
    run = FolderRun(Screener(options, Pseudonymizer.from_key_file(key),
                             hash_pixels=False), dst)
    run.open()
    paths = sorted(p for p in corpus.rglob("*") if p.is_file())
    try:
        for done, result in enumerate(prepared(paths, corpus, key, options, run.staging,
                                               workers), start=1):
            run.take(result)
            if after_each is not None:
                after_each(done)
    finally:
        run.close()
    return run


def test_a_worker_killed_mid_run_changes_nothing(corpus: Path, tmp_path: Path) -> None:
    single = _run(corpus, tmp_path / "one", 1)
    kill_one = WorkerKiller()
    killed = kill_one.killed
    parallel = _run(corpus, tmp_path / "two", 2, kill_one)
    assert killed
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert parallel.screener.report() == single.screener.report()
    assert [vars(o) for o in parallel.outputs] == [vars(o) for o in single.outputs]
    assert not kill_one.workers()


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fresh-interpreters"])
def test_a_file_no_worker_survives_is_excluded_with_the_reason(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fork: bool) -> None:
    """Every worker that takes this file dies on it (as on a decoder that crashes the
    interpreter): after two deaths it is excluded with the reason, the run goes on and
    every other file is written; whether workers are forks or fresh interpreters."""
    victim = sorted((corpus / "ct").rglob("*.dcm"))[20]
    inputs = sorted(p for p in corpus.rglob("*") if p.is_file())
    parent = os.getpid()
    original = folder_deid.FolderWorker.__call__

    def crashing(self: folder_deid.FolderWorker, path: Path, root: Path | None
                 ) -> folder_deid.FileResult:
        if path == victim and os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, path, root)

    # A fork inherits this process's code; a fresh interpreter gets it at its start.
    monkeypatch.setattr(folder_deid.FolderWorker, "__call__", crashing)
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(
        "import os, signal\n"
        "if os.environ.get('CRASH_ON'):\n"
        "    from tributary.spoke import folder_deid\n"
        "    original = folder_deid.FolderWorker.__call__\n"
        "    def crashing(self, path, root):\n"
        "        if str(path) == os.environ['CRASH_ON']:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return original(self, path, root)\n"
        "    folder_deid.FolderWorker.__call__ = crashing\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(plant), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("CRASH_ON", str(victim))
    key = corpus.parent / "key"
    options = DeidOptions()
    run = FolderRun(Screener(options, Pseudonymizer.from_key_file(key),
                             hash_pixels=False), tmp_path / "out")
    run.open()
    pool = PreparePool(2, key, options.model_dump_json(), run.staging, task=FOLDER_TASK,
                       fork=fork)
    jobs = [(str(p), str(corpus)) for p in inputs]
    try:
        for job, result in zip(jobs, pool.map(jobs), strict=True):
            run.take(folder_deid.lost(job[0], result) if isinstance(result, Excluded)
                     else result)
    finally:
        run.close()
    report = run.screener.report()
    assert [f.path for f in report.files] == [str(p) for p in inputs]
    lost = next(f for f in report.files if f.path == str(victim))
    assert lost.excluded
    assert lost.findings[0].detail.startswith(
        "two worker processes died preparing this file (the last killed by signal "
        "SIGKILL)"), lost.findings
    written = {o.output for o in run.outputs}
    assert written == set(_files(tmp_path / "out"))
    assert len(written) == len(inputs) - len(report.excluded())
    assert str(victim) not in {o.source for o in run.outputs}


def test_the_default_workers_are_the_cores_this_process_may_use() -> None:
    """A process pinned to one core (a container's or a batch job's cpuset) gets one
    process, for deidentify and for ingest, whatever the machine has."""
    probe = ("import os\nos.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
             "from tributary.spoke.config import CatalogSettings\n"
             "from tributary.spoke.cores import usable_cores\n"
             "print(usable_cores(), CatalogSettings().workers)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["1", "1"], done.stderr
