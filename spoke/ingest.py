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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tributary.spoke.catalog import Catalog
from tributary.spoke.config import SpokeConfig
from tributary.spoke.pseudonyms import Pseudonymizer
from tributary.spoke.sources import Source, open_source
from tributary.spoke.store import DeidStore, Excluded, prepare_instance

log = logging.getLogger(__name__)

#: Column of the attributes CSV holding the institution's patient ID (DICOM PatientID).
PATIENT_COLUMN = "patient_id"
_COMMIT_EVERY = 200

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


def _ingest_source(source: Source, catalog: Catalog, store: DeidStore,
                   pseudonyms: Pseudonymizer, report: IngestReport,
                   progress: Progress | None) -> None:
    items = source.items()
    known = catalog.known_refs(source.name)
    counts = report.per_source.setdefault(
        source.name, {"inputs": len(items), "stored": 0, "unchanged": 0, "duplicates": 0,
                      "excluded": 0})
    for done, item in enumerate(items, start=1):
        if known.get(item.ref) == item.fingerprint:
            counts["unchanged"] += 1
        else:
            try:
                prepared = prepare_instance(item.load(), pseudonyms)
            except Excluded as exc:
                catalog.record_input(source.name, item.ref, item.fingerprint, "excluded",
                                     exc.reason)
                log.warning("excluded %s:%s: %s", source.name, item.ref, exc.reason)
                counts["excluded"] += 1
            else:
                existing = catalog.instance_digest(prepared.instance_uid)
                if existing is None:
                    digest = store.put(prepared)
                    catalog.add_instance(prepared, digest)
                    catalog.record_input(source.name, item.ref, item.fingerprint, "stored",
                                         instance_uid=prepared.instance_uid)
                    counts["stored"] += 1
                elif existing == prepared.digest:
                    previously = catalog.input_state(source.name, item.ref)
                    if previously is not None and previously[1] == "stored":
                        # the same file touched again: nothing changed
                        catalog.record_input(source.name, item.ref, item.fingerprint,
                                             "stored", instance_uid=prepared.instance_uid)
                        counts["unchanged"] += 1
                    else:
                        catalog.record_input(source.name, item.ref, item.fingerprint,
                                             "duplicate", "same instance as one already "
                                             "stored", prepared.instance_uid)
                        counts["duplicates"] += 1
                else:
                    catalog.record_input(
                        source.name, item.ref, item.fingerprint, "excluded",
                        "conflicts with a stored instance (same SOP Instance UID, different "
                        "content); the stored one is kept", prepared.instance_uid)
                    counts["excluded"] += 1
        if done % _COMMIT_EVERY == 0:
            catalog.commit()
        if progress is not None:
            progress(source.name, done, len(items))
    catalog.commit()
    for key in ("stored", "unchanged", "duplicates", "excluded"):
        setattr(report, key, getattr(report, key) + counts[key])


def ingest(config: SpokeConfig, catalog: Catalog | None = None,
           progress: Progress | None = None,
           sources: list[Source] | None = None) -> IngestReport:
    """Ingest every configured source, then refresh the case attributes. Raises
    :class:`~tributary.spoke.sources.SourceUnavailable` if a source cannot be reached
    (what was ingested before that stays)."""
    own = catalog is None
    catalog = catalog or open_catalog(config)
    pseudonyms = Pseudonymizer.from_key_file(config.work_dir / "pseudonym.key")
    store = DeidStore(store_root(config.work_dir))
    report = IngestReport()
    try:
        with _exclusive(config.work_dir):
            path = config.attributes_path
            ignore = frozenset({path}) if path is not None else frozenset()
            for source in sources or [open_source(s, ignore) for s in config.all_sources]:
                _ingest_source(source, catalog, store, pseudonyms, report, progress)
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


def series_folders(config: SpokeConfig, series_ids: list[str]) -> dict[str, Path]:
    """The store folder of each series: what a container mounts, and nothing else."""
    store = DeidStore(store_root(config.work_dir))
    return {sid: store.series_dir(sid) for sid in series_ids}
