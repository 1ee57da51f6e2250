"""Every file accounted for under parallelism: a file that breaks pydicom's writer and a
worker process killed mid-run both end as stored or excluded with a reason, the run goes
on, the outcome is the one a single process gives, and the report matches the disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from child_processes import NewChildren, WorkerKiller
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from tributary.spoke import ingest as ingest_module
from tributary.spoke.catalog import Catalog
from tributary.spoke.config import SpokeConfig
from tributary.spoke.deid import DeidOptions
from tributary.spoke.ingest import ingest, open_catalog, store_root
from tributary.spoke.preparing import PreparePool
from tributary.spoke.store import DeidStore, Excluded, PreparedInstance
from tributary.testbed.federation import generate_cohort

#: pydicom's test file whose data set is Implicit VR although its transfer syntax (JPEG
#: Baseline) is explicit: pydicom reads it and then fails to write it, with a TypeError
#: on (0008,0060).
BROKEN = "SC_rgb_jpeg.dcm"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("corpus") / "data"
    generate_cohort(data / "ct", 3, seed=31, site="Worker General", size=64, slices=30)
    (data / "ct" / "attributes.csv").unlink()
    shutil.copy(get_testdata_file(BROKEN), data / BROKEN)
    (data / "notes.txt").write_text("not an image")
    return data


@pytest.fixture
def few_files_suffice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_module, "_PARALLEL_MIN", 4)


def _config(root: Path, data: Path, workers: int) -> SpokeConfig:
    (root / "pseudonym.key").parent.mkdir(parents=True, exist_ok=True)
    return SpokeConfig(spoke_id="workers", data_dir=data, work_dir=root / "work",
                       hub_public_key=root / "hub.pub", catalog={"workers": workers})


def _outcome(catalog: Catalog) -> dict[str, tuple[str, str | None]]:
    return {e.ref: (e.status, e.reason) for e in catalog.exclusions()}


def _assert_report_matches_disk(config: SpokeConfig, files: int) -> None:
    catalog = open_catalog(config)
    try:
        rows = catalog._db.execute("SELECT status, COUNT(*) FROM inputs GROUP BY status")
        by_status = dict(rows.fetchall())
        assert sum(by_status.values()) == files, by_status  # every input has a row
        digests = {r[0] for r in catalog._db.execute("SELECT digest FROM instances")}
        reasons = catalog._db.execute("SELECT reason FROM inputs WHERE status='excluded'")
        assert all(r[0] for r in reasons), "an exclusion without its reason"
    finally:
        catalog.close()
    store = DeidStore(store_root(config.work_dir))
    on_disk = {p.name.removesuffix(".dcm") for p in (store.root / "objects").rglob("*.dcm")}
    assert on_disk == digests, "the store holds exactly the catalogued objects"
    assert not list((store.root / "objects").glob(".tmp-*")), "nothing left staged"
    linked = {p.name.removesuffix(".dcm") for p in (store.root / "series").rglob("*.dcm")}
    assert linked == digests


def test_a_file_that_breaks_the_writer_is_excluded_with_its_reason(
        corpus: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file(BROKEN))
    with pytest.raises(TypeError):  # the failure this test is about still exists
        ds.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    config = _config(tmp_path, corpus, workers=1)
    report = ingest(config)
    files = sum(1 for p in corpus.rglob("*") if p.is_file())
    assert report.stored + report.duplicates + report.excluded == files
    with open_catalog(config) as catalog:
        status, reason = _outcome(catalog)[BROKEN]
    assert status == "excluded"
    assert reason.startswith("deidentification-failed: TypeError") and "(0008," in reason
    _assert_report_matches_disk(config, files)


def test_a_worker_killed_mid_run_changes_nothing(corpus: Path, tmp_path: Path,
                                                 few_files_suffice: None) -> None:
    files = sum(1 for p in corpus.rglob("*") if p.is_file())
    single = _config(tmp_path / "one", corpus, workers=1)
    ingest(single)
    killer = WorkerKiller()
    killed = killer.killed

    def kill_one(source: str, done: int, total: int) -> None:
        killer(done)

    parallel = _config(tmp_path / "two", corpus, workers=2)
    parallel.work_dir.mkdir(parents=True)  # the same key: the same pseudonyms
    shutil.copy(single.work_dir / "pseudonym.key", parallel.work_dir / "pseudonym.key")
    report = ingest(parallel, progress=kill_one)
    assert killed
    assert report.stored + report.duplicates + report.excluded == files
    with open_catalog(single) as one, open_catalog(parallel) as two:
        assert _outcome(two) == _outcome(one)  # the killed worker's files were retried
        assert two.snapshot() == one.snapshot()
    _assert_report_matches_disk(parallel, files)


def test_a_file_two_workers_die_on_is_excluded_and_the_run_goes_on(
        corpus: Path, tmp_path: Path) -> None:
    """A hostile image that keeps its worker busy for long (a large ultrasound of noise:
    OCR looks for text in it for about fifteen seconds): the worker is killed after the
    per-file timeout, with the OCR it started; the file goes to another worker, which is
    killed too; the file is excluded with the reason and the files behind it are
    prepared."""
    paths = sorted(str(p) for p in (corpus / "ct").rglob("*.dcm"))[:24]
    slow = tmp_path / "slow.dcm"
    _slow_to_screen(slow)
    paths.insert(5, str(slow))
    staging = tmp_path / "objects"
    staging.mkdir()
    pool = PreparePool(2, tmp_path / "pseudonym.key", DeidOptions().model_dump_json(),
                       staging, file_timeout=3)
    results_iter = pool.map([(p, None) for p in paths])
    results = [next(results_iter)]
    groups = set(pool.pids())  # each worker leads a process group of its own
    results += list(results_iter)
    assert len(results) == len(paths)
    lost = [i for i, r in enumerate(results) if isinstance(r, Excluded)]
    assert lost == [5], [r for r in results if isinstance(r, Excluded)]
    reason = results[5].reason  # type: ignore[union-attr]
    assert reason == ("deidentification-failed: two worker processes died preparing this "
                      "file (the last stopped after 3 s on it); it is left out"), reason
    written = [r for r in results if isinstance(r, PreparedInstance)]
    assert len(written) == len(paths) - 1
    assert {Path(r.staged).name for r in written if r.staged} == \
        {p.name for p in staging.glob(".tmp-*")}
    assert pool.pids() == []  # closed when the results ran out
    left = [pid for pid, group in _process_groups() if group in groups]
    assert not left, [Path(f"/proc/{p}/stat").read_text() for p in left]


def _process_groups() -> list[tuple[int, int]]:
    """(pid, process group) of every live process (a zombie has stopped: it is dead but
    not yet reaped by its new parent, which here need not be a reaping init)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                found.append((int(entry.name), int(fields[2])))
    return found


def _slow_to_screen(path: Path) -> None:
    """A valid ultrasound image of 2048² binary noise: text-prone, so OCR reads it."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.BurnedInAnnotation = "US", "NO"
    ds.Rows = ds.Columns = 2048
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 7, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    noise = np.random.default_rng(7).random((2048, 2048)) > 0.5
    ds.PixelData = (noise.astype(np.uint8) * 255).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_a_small_set_stays_in_one_process(corpus: Path, tmp_path: Path) -> None:
    """Under the threshold no worker starts: two workers are never slower than one."""
    files = sum(1 for p in corpus.rglob("*") if p.is_file())
    seen: list[int] = []
    _workers = NewChildren()
    config = _config(tmp_path, corpus, workers=2)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(ingest_module, "_PARALLEL_MIN", files + 1)
    try:
        ingest(config, progress=lambda *_: seen.extend(_workers()))
    finally:
        monkeypatch.undo()
    assert seen == []
    _assert_report_matches_disk(config, files)
