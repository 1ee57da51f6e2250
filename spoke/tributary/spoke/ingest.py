"""Ingest: bring the configured sources into the de-identified store and the catalog.

Each input is read, screened and de-identified once; inputs already recorded with the
same fingerprint are skipped without being read, so a second run over unchanged sources
is a no-op and new files are picked up incrementally. One ingest runs at a time per work
folder (a file lock), whoever starts it: the agent before an experiment or the CLI."""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tributary.spoke.catalog import Catalog
from tributary.spoke.config import SpokeConfig
from tributary.spoke.preparing import PreparePool
from tributary.spoke.pseudonyms import Pseudonymizer
from tributary.spoke.sources import Source, SourceItem, open_source
from tributary.spoke.store import DeidStore, Excluded, PreparedInstance, Preparer
from tributary.spoke.store_migration import MigrationReport, migrate_layout

log = logging.getLogger(__name__)

#: Column of the attributes CSV holding the institution's patient ID (DICOM PatientID).
PATIENT_COLUMN = "patient_id"
_COMMIT_EVERY = 200
#: Fewer new files than this are prepared in this process alone: a worker takes about a
#: third of a second of a CPU to start, which a small set would not win back.
_PARALLEL_MIN = 64

#: progress(source name, done, total) after each input
Progress = Callable[[str, int, int], None]


@dataclass
class IngestReport:
    stored: int = 0
    unchanged: int = 0
    duplicates: int = 0
    excluded: int = 0
    attributes_cases: int = 0
    attributes_unmatched: int = 0
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def catalog_path(work_dir: Path) -> Path:
    return work_dir / "catalog.db"


def store_root(work_dir: Path) -> Path:
    return work_dir / "store"


def open_catalog(config: SpokeConfig) -> Catalog:
    """The spoke's catalog, applying its release policy to attribute criteria."""
    return Catalog(catalog_path(config.work_dir), config.policy.releasable_attributes)


@contextmanager
def _exclusive(work_dir: Path) -> Iterator[None]:
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / "ingest.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cell(text: str) -> Any:
    """CSV cells are text; numbers, booleans and JSON lists/objects keep their type."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_attributes(path: Path) -> dict[str, dict[str, Any]]:
    """Case attributes keyed by the institution's patient ID, from a CSV file with a
    ``patient_id`` column (empty cells are absent attributes) or a JSON object mapping
    patient IDs to attribute objects."""
    if not path.exists():
        raise FileNotFoundError(f"attributes file {path} does not exist")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"{path} must map patient IDs to attribute objects")
        return {str(k): v for k, v in data.items()}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or PATIENT_COLUMN not in reader.fieldnames:
            raise ValueError(f"{path} needs a header row with a {PATIENT_COLUMN!r} column")
        out: dict[str, dict[str, Any]] = {}
        for line, row in enumerate(reader, start=2):
            patient = (row.pop(PATIENT_COLUMN) or "").strip()
            if not patient:
                raise ValueError(f"{path}:{line}: empty {PATIENT_COLUMN}")
            if patient in out:
                raise ValueError(f"{path}:{line}: patient listed twice")
            out[patient] = {k: _cell(v) for k, v in row.items()
                            if k and v is not None and v.strip() != ""}
        return out


def _prepare_one(preparer: Preparer, item: SourceItem) -> PreparedInstance | Excluded:
    try:
        if item.path is not None:
            return preparer.from_file(item.path, item.root)
        assert item.load is not None
        return preparer.from_dataset(item.load(), item.ref)
    except Excluded as exc:
        return exc
    except Exception as exc:  # a bug must cost one file, not the run
        return Excluded(f"deidentification-failed: {type(exc).__name__}: {exc}"[:300])


def _prepared(items: list[SourceItem], preparer: Preparer, key_file: Path,
              workers: int) -> Iterator[PreparedInstance | Excluded]:
    """Prepared instances (or exclusions) in input order. With ``workers`` > 1 and enough
    files, ``workers - 1`` worker processes help this one, which keeps preparing files
    itself between storing the others' (so it never waits for them to start)."""
    if workers > 1 and len(items) >= _PARALLEL_MIN and all(i.path for i in items):
        assert preparer.staging is not None
        pool = PreparePool(workers - 1, key_file,
                           preparer.deidentifier.options.model_dump_json(), preparer.staging)
        by_path = {str(i.path): i for i in items}
        yield from pool.map([(str(i.path), str(i.root) if i.root else None) for i in items],
                            local=lambda job: _prepare_one(preparer, by_path[job[0]]))
        return
    for item in items:
        yield _prepare_one(preparer, item)


class _Recorder:
    """Turns prepared instances into store objects and catalog rows, in input order, and
    writes the rows in batches (one transaction per :data:`_COMMIT_EVERY` inputs). What
    the batch holds is looked up here first, so decisions do not wait for a commit."""

    def __init__(self, source: str, catalog: Catalog, store: DeidStore) -> None:
        self.source, self.catalog, self.store = source, catalog, store
        self.inputs: list[tuple[str, str, str, str | None, str | None]] = []
        self.instances: list[tuple[PreparedInstance, str]] = []
        self._uids: dict[str, str] = {}
        self._pixels: dict[str, str] = {}

    def flush(self) -> None:
        self.catalog.add_instances(self.instances)
        self.catalog.record_inputs(self.source, self.inputs)
        self.catalog.commit()
        self.inputs, self.instances = [], []
        self._uids, self._pixels = {}, {}

    def excluded(self, item: SourceItem, reason: str) -> str:
        self.inputs.append((item.ref, item.fingerprint, "excluded", reason, None))
        log.warning("excluded %s:%s: %s", self.source, item.ref, reason)
        return "excluded"

    def record(self, item: SourceItem, prepared: PreparedInstance) -> str:
        """Store a prepared instance unless the catalog has it; returns the counter to
        bump. A staged file that does not enter the store is removed."""
        uid, digest = prepared.instance_uid, prepared.digest
        existing = self._uids.get(uid) or self.catalog.instance_digest(uid)
        if existing is None:
            pixels = prepared.pixel_digest
            twin = pixels and (self._pixels.get(pixels) or
                               self.catalog.instance_with_pixels(pixels))
            if twin:
                self.store.discard(prepared)
                return self.excluded(item, "duplicate-pixels: same pixel data as a stored "
                                           "instance under another header")
            self.store.put(prepared)
            self.instances.append((prepared, digest))
            self._uids[uid] = digest
            if pixels:
                self._pixels[pixels] = uid
            self.inputs.append((item.ref, item.fingerprint, "stored", prepared.review, uid))
            return "stored"
        self.store.discard(prepared)
        if existing == digest:
            previously = self.catalog.input_state(self.source, item.ref)
            if previously is not None and previously[1] == "stored":
                # the same file touched again: nothing changed
                self.inputs.append((item.ref, item.fingerprint, "stored", prepared.review,
                                    uid))
                return "unchanged"
            self.inputs.append((item.ref, item.fingerprint, "duplicate",
                                "same instance as one already stored", uid))
            return "duplicates"
        self.inputs.append((item.ref, item.fingerprint, "excluded",
                            "conflicts with a stored instance (same SOP Instance UID, "
                            "different content); the stored one is kept", uid))
        return "excluded"


def _ingest_source(source: Source, catalog: Catalog, store: DeidStore, preparer: Preparer,
                   key_file: Path, workers: int, report: IngestReport,
                   progress: Progress | None) -> None:
    items = source.items()
    known = catalog.known_refs(source.name)
    pending = [i for i in items if known.get(i.ref) != i.fingerprint]
    counts = report.per_source.setdefault(
        source.name, {"inputs": len(items), "stored": 0, "unchanged": len(items) - len(pending),
                      "duplicates": 0, "excluded": 0})
    if progress is not None:
        progress(source.name, counts["unchanged"], len(items))
    recorder = _Recorder(source.name, catalog, store)
    results = _prepared(pending, preparer, key_file, workers)
    try:
        for done, (item, prepared) in enumerate(zip(pending, results, strict=True), start=1):
            if isinstance(prepared, Excluded):
                counts[recorder.excluded(item, prepared.reason)] += 1
            else:
                counts[recorder.record(item, prepared)] += 1
            if done % _COMMIT_EVERY == 0:
                recorder.flush()
            if progress is not None:
                progress(source.name, len(items) - len(pending) + done, len(items))
    finally:
        recorder.flush()  # what was decided is kept, even when the run stops
    for key in ("stored", "unchanged", "duplicates", "excluded"):
        setattr(report, key, getattr(report, key) + counts[key])


def ingest(config: SpokeConfig, catalog: Catalog | None = None,
           progress: Progress | None = None,
           sources: list[Source] | None = None) -> IngestReport:
    """Ingest every configured source, de-identified under the ``[deidentification]``
    options, then refresh the case attributes. Raises
    :class:`~tributary.spoke.sources.SourceUnavailable` if a source cannot be reached
    (what was ingested before that stays), and
    :class:`~tributary.spoke.catalog.ProfileChanged` if the store was made under other
    options (see :func:`rebuild`)."""
    own = catalog is None
    catalog = catalog or open_catalog(config)
    key_file = config.work_dir / "pseudonym.key"
    pseudonyms = Pseudonymizer.from_key_file(key_file)
    store = DeidStore(store_root(config.work_dir))
    report = IngestReport()
    try:
        with _exclusive(config.work_dir):
            store.clear_staging()  # what a crashed run left half-done
            preparer = Preparer(pseudonyms, config.deidentification, store.staging)
            catalog.claim_profile(preparer.profile)
            path = config.attributes_path
            ignore = frozenset({path}) if path is not None else frozenset()
            try:
                for source in sources or [open_source(s, ignore) for s in config.all_sources]:
                    _ingest_source(source, catalog, store, preparer, key_file,
                                   config.catalog.workers, report, progress)
            finally:
                # every result was stored or discarded by now: what is still staged is a
                # killed worker's last file (written, never reported), and goes
                store.clear_staging()
            if path is not None:
                by_patient = load_attributes(path)
                known = {c.case_id for c in catalog.cases()}
                by_case = {pseudonyms.case_id(f"patient:{patient}"): values
                           for patient, values in by_patient.items()}
                matched = {case: v for case, v in by_case.items() if case in known}
                catalog.replace_attributes(matched)
                report.attributes_cases = len(matched)
                report.attributes_unmatched = len(by_case) - len(matched)
    finally:
        if own:
            catalog.close()
    return report


def rebuild(config: SpokeConfig) -> None:
    """Empty the store and the catalog (under the ingest lock) so the next ingest prepares
    every input again, e.g. under new ``[deidentification]`` options. Refused (raises
    :class:`WorkDirBusy`) while the agent runs: its running cases mount the store."""
    from tributary.spoke.journal import claim_work_dir  # the wire messages: not for ingest

    agent_lock = claim_work_dir(config.work_dir)
    try:
        with _exclusive(config.work_dir):
            catalog_file = catalog_path(config.work_dir)
            for suffix in ("", "-wal", "-shm"):
                catalog_file.with_name(catalog_file.name + suffix).unlink(missing_ok=True)
            if store_root(config.work_dir).exists():
                shutil.rmtree(store_root(config.work_dir))
    finally:
        os.close(agent_lock)


def migrate_store(config: SpokeConfig) -> MigrationReport:
    """Convert a store written before its format was marked (see
    :mod:`tributary.spoke.store_migration`). Refused (raises :class:`WorkDirBusy`)
    while the agent runs; under the ingest lock, so no ingest writes meanwhile."""
    from tributary.spoke.journal import claim_work_dir  # the wire messages: not for ingest

    agent_lock = claim_work_dir(config.work_dir)
    try:
        with _exclusive(config.work_dir):
            root = store_root(config.work_dir)
            if not root.exists():
                return MigrationReport(already_current=True)
            with open_catalog(config) as catalog:
                return migrate_layout(root, catalog)
    finally:
        os.close(agent_lock)


#: audit(action, target, **detail): the agent's audit log
Audit = Callable[..., None]


def refresh_catalog(config: SpokeConfig, catalog: Catalog, audit: Audit,
                    target: str) -> IngestReport | None:
    """The incremental ingest the agent runs before it selects from the catalog (an
    experiment's cohort, a count), when ``[catalog] ingest_before_selection`` asks for it.
    A failing ingest (PACS unreachable...) is audited and the selection goes on with what
    is already catalogued."""
    if not config.catalog.ingest_before_selection:
        return None
    try:
        report = ingest(config, catalog)
    except Exception as exc:
        log.error("ingest before %s failed: %s", target, exc)
        audit("catalog.ingest_failed", target, error=f"{type(exc).__name__}: {exc}"[:2000])
        return None
    audit("catalog.ingested", target, stored=report.stored, duplicates=report.duplicates,
          excluded=report.excluded, unchanged=report.unchanged)
    return report


def series_folders(config: SpokeConfig, series_ids: list[str]) -> dict[str, Path]:
    """The store folder of each series: what a container mounts, and nothing else."""
    store = DeidStore(store_root(config.work_dir))
    return {sid: store.series_dir(sid) for sid in series_ids}
