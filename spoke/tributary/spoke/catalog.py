"""The spoke's catalog: an SQLite index of the de-identified store (cases, studies, series,
instances), the attributes the institution supplies per case, and every input the
ingest saw (stored, duplicate or excluded, with the reason). Experiments and federated
counts select cohorts from it by :class:`CohortSelection` criteria.

Only pseudonymous identifiers and de-identified metadata describe cases here; source
references (file paths, PACS UIDs) appear only in the ``inputs`` table, which exists so
re-ingest is incremental and exclusions can be explained to the data steward. The file
lives in the spoke's private work folder and never leaves the institution."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tributary.spoke.store import PreparedInstance

if TYPE_CHECKING:  # the wire protocol's models: 0.15 s of an ingest's start, for a name
    from tributary.protocol.messages import CohortSelection

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    case_id TEXT PRIMARY KEY,
    added_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    study_id TEXT PRIMARY KEY,
    case_id TEXT NOT NULL REFERENCES cases(case_id),
    description TEXT
);
CREATE TABLE IF NOT EXISTS series (
    series_id TEXT PRIMARY KEY,
    study_id TEXT NOT NULL REFERENCES studies(study_id),
    case_id TEXT NOT NULL REFERENCES cases(case_id),
    modality TEXT NOT NULL,
    body_part TEXT,
    description TEXT,
    rows INTEGER,
    columns INTEGER,
    pixel_spacing TEXT,
    slice_thickness REAL
);
CREATE INDEX IF NOT EXISTS series_case ON series(case_id);
CREATE TABLE IF NOT EXISTS instances (
    instance_uid TEXT PRIMARY KEY,
    series_id TEXT NOT NULL REFERENCES series(series_id),
    digest TEXT NOT NULL,
    instance_number INTEGER,
    pixels TEXT
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_id);
CREATE INDEX IF NOT EXISTS instances_pixels ON instances(pixels);
CREATE TABLE IF NOT EXISTS attributes (
    case_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (case_id, name)
);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS inputs (
    source TEXT NOT NULL,
    ref TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('stored', 'duplicate', 'excluded')),
    reason TEXT,
    instance_uid TEXT,
    seen_at TEXT NOT NULL,
    PRIMARY KEY (source, ref)
);
"""


class ProfileChanged(ValueError):
    """The store was de-identified under other options than the configuration now asks
    for: mixing them would make custody records wrong, so ingest stops until the store is
    rebuilt (`tributary spoke ingest --rebuild`)."""


class SelectionRefused(ValueError):
    """Criteria this spoke will not evaluate (e.g. on an attribute it may not release)."""


def released_attributes(case: CatalogCase, requested: list[str],
                        releasable: Collection[str]) -> dict[str, Any]:
    """Only attributes the study asked for AND the site's policy allows ever leave."""
    return {k: case.attributes[k] for k in requested
            if k in releasable and k in case.attributes}


def refused_attributes(requested: list[str], releasable: Collection[str]) -> list[str]:
    """Attributes a study asked for that this site's policy never releases."""
    return [k for k in dict.fromkeys(requested) if k not in releasable]


@dataclass(frozen=True)
class CatalogSeries:
    series_id: str
    study_id: str
    modality: str
    body_part: str | None
    description: str | None
    rows: int | None
    columns: int | None
    pixel_spacing: list[float] | None
    slice_thickness: float | None
    instance_count: int


@dataclass(frozen=True)
class CatalogCase:
    case_id: str
    series: list[CatalogSeries]
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def modalities(self) -> set[str]:
        return {s.modality for s in self.series}


@dataclass(frozen=True)
class Exclusion:
    source: str
    ref: str
    status: str
    reason: str
    seen_at: str


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _series_matches(series: CatalogSeries, selection: CohortSelection) -> bool:
    return ((selection.modality is None or series.modality == selection.modality)
            and (selection.body_part is None
                 or (series.body_part or "").upper() == selection.body_part.upper())
            and (selection.min_slices is None or series.instance_count >= selection.min_slices)
            and (selection.max_slices is None or series.instance_count <= selection.max_slices))


class Catalog:
    """One SQLite file; safe to share between threads (one lock), and between processes
    (WAL: an agent can select while `tributary spoke ingest` runs)."""

    def __init__(self, path: Path, releasable: Collection[str] = ()) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.releasable = frozenset(releasable)
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def commit(self) -> None:
        with self._lock:
            self._db.commit()

    # -- ingest side ----------------------------------------------------------------------
    def deid_profile(self) -> str | None:
        """The de-identification profile every stored instance was prepared under (None
        while the store is empty)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE name='deid_profile'"
                                   ).fetchone()
        return row[0] if row else None

    def claim_profile(self, profile: str) -> None:
        """Record ``profile`` for the store, or raise :class:`ProfileChanged` if instances
        were stored under another one."""
        recorded = self.deid_profile()
        if recorded == profile:
            return
        if recorded is not None and self.counts()["instances"]:
            raise ProfileChanged(
                f"the store was de-identified under {recorded!r} but [deidentification] now "
                f"asks for {profile!r}; rebuild it with `tributary spoke ingest --rebuild`")
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO settings VALUES ('deid_profile', ?)",
                             (profile,))

    def input_state(self, source: str, ref: str) -> tuple[str, str] | None:
        """(fingerprint, status) recorded for this input, if it was seen before."""
        with self._lock:
            row = self._db.execute("SELECT fingerprint, status FROM inputs WHERE source=? "
                                   "AND ref=?", (source, ref)).fetchone()
        return (row[0], row[1]) if row else None

    def known_refs(self, source: str) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT ref, fingerprint FROM inputs WHERE source=?",
                                         (source,)))

    def instance_digest(self, instance_uid: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT digest FROM instances WHERE instance_uid=?",
                                   (instance_uid,)).fetchone()
        return row[0] if row else None

    def rename_objects(self, renames: dict[str, tuple[str, str | None]]) -> int:
        """Store objects renamed ``old digest -> (new digest, pixel digest)``, in one
        transaction (a store migration); returns the rows changed."""
        with self._lock, self._db:
            changed = 0
            for old, (new, pixels) in renames.items():
                changed += self._db.execute(
                    "UPDATE instances SET digest=?, pixels=? WHERE digest=?",
                    (new, pixels, old)).rowcount
        return changed

    def instance_with_pixels(self, pixel_digest: str | None) -> str | None:
        if pixel_digest is None:
            return None
        with self._lock:
            row = self._db.execute("SELECT instance_uid FROM instances WHERE pixels=?",
                                   (pixel_digest,)).fetchone()
        return row[0] if row else None

    def record_input(self, source: str, ref: str, fingerprint: str, status: str,
                     reason: str | None = None, instance_uid: str | None = None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO inputs VALUES (?, ?, ?, ?, ?, ?, ?)",
                (source, ref, fingerprint, status, reason, instance_uid,
                 datetime.now(UTC).isoformat(timespec="seconds")))

    def record_inputs(self, source: str,
                      rows: list[tuple[str, str, str, str | None, str | None]]) -> None:
        """Many ``(ref, fingerprint, status, reason, instance_uid)`` at once."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO inputs VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 [(source, *row, now) for row in rows])

    def add_instances(self, instances: list[tuple[PreparedInstance, str]]) -> None:
        """Many instances (with their store digests) in one go."""
        if not instances:
            return
        now = datetime.now(UTC).isoformat(timespec="seconds")
        cases, studies, series, rows = {}, {}, {}, []
        for instance, digest in instances:
            meta = instance.metadata
            spacing = meta.get("pixel_spacing")
            cases.setdefault(instance.case_id, (instance.case_id, now))
            studies.setdefault(instance.study_id, (instance.study_id, instance.case_id,
                                                   meta.get("study_description")))
            series.setdefault(instance.series_id, (
                instance.series_id, instance.study_id, instance.case_id, meta["modality"],
                meta.get("body_part"), meta.get("series_description"), meta.get("rows"),
                meta.get("columns"), json.dumps(spacing) if spacing else None,
                meta.get("slice_thickness")))
            rows.append((instance.instance_uid, instance.series_id, digest,
                         meta.get("instance_number"), instance.pixel_digest))
        with self._lock:
            db = self._db
            db.executemany("INSERT OR IGNORE INTO cases VALUES (?, ?)", cases.values())
            db.executemany("INSERT OR IGNORE INTO studies VALUES (?, ?, ?)", studies.values())
            db.executemany("INSERT OR IGNORE INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           series.values())
            db.executemany("INSERT INTO instances VALUES (?, ?, ?, ?, ?)", rows)

    def add_instance(self, instance: PreparedInstance, digest: str) -> None:
        meta = instance.metadata
        spacing = meta.get("pixel_spacing")
        with self._lock:
            db = self._db
            db.execute("INSERT OR IGNORE INTO cases VALUES (?, ?)",
                       (instance.case_id, datetime.now(UTC).isoformat(timespec="seconds")))
            db.execute("INSERT OR IGNORE INTO studies VALUES (?, ?, ?)",
                       (instance.study_id, instance.case_id, meta.get("study_description")))
            db.execute(
                "INSERT OR IGNORE INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (instance.series_id, instance.study_id, instance.case_id, meta["modality"],
                 meta.get("body_part"), meta.get("series_description"), meta.get("rows"),
                 meta.get("columns"), json.dumps(spacing) if spacing else None,
                 meta.get("slice_thickness")))
            db.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?)",
                       (instance.instance_uid, instance.series_id, digest,
                        meta.get("instance_number"), instance.pixel_digest))

    def replace_attributes(self, attributes: dict[str, dict[str, Any]]) -> None:
        """Replace all case attributes (keyed by case pseudonym) in one transaction."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM attributes")
            self._db.executemany(
                "INSERT INTO attributes VALUES (?, ?, ?)",
                [(case, name, json.dumps(value)) for case, values in attributes.items()
                 for name, value in values.items()])

    # -- reading --------------------------------------------------------------------------
    def cases(self) -> list[CatalogCase]:
        """Every case with all its series and attributes, ordered by case pseudonym."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.case_id, s.series_id, s.study_id, s.modality, s.body_part, "
                "s.description, s.rows, s.columns, s.pixel_spacing, s.slice_thickness, "
                "COUNT(i.instance_uid) FROM series s JOIN instances i USING (series_id) "
                "GROUP BY s.series_id ORDER BY s.case_id, s.series_id").fetchall()
            attribute_rows = self._db.execute(
                "SELECT case_id, name, value FROM attributes").fetchall()
        attributes: dict[str, dict[str, Any]] = {}
        for case_id, name, value in attribute_rows:
            attributes.setdefault(case_id, {})[name] = json.loads(value)
        grouped: dict[str, list[CatalogSeries]] = {}
        for row in rows:
            grouped.setdefault(row[0], []).append(CatalogSeries(
                series_id=row[1], study_id=row[2], modality=row[3], body_part=row[4],
                description=row[5], rows=row[6], columns=row[7],
                pixel_spacing=json.loads(row[8]) if row[8] else None,
                slice_thickness=row[9], instance_count=row[10]))
        return [CatalogCase(case_id=case_id, series=series,
                            attributes=attributes.get(case_id, {}))
                for case_id, series in grouped.items()]

    def catalogued_years(self) -> list[int]:
        """The year each case entered the catalog, oldest first: the only dates the
        site's published description uses (de-identification removes the studies' own),
        and it generalises even these (:mod:`tributary.spoke.description`)."""
        with self._lock:
            rows = self._db.execute("SELECT added_at FROM cases ORDER BY added_at").fetchall()
        return [int(row[0][:4]) for row in rows]

    def check(self, selection: CohortSelection) -> None:
        """Refuse criteria on attributes the site's policy does not allow to be released:
        filtering on them would let counts reveal them."""
        hidden = sorted(set(selection.attributes) - self.releasable)
        if hidden:
            raise SelectionRefused(f"criteria on attributes this site does not release: "
                                   f"{', '.join(hidden)}")

    def select(self, selection: CohortSelection, *, policy: bool = True) -> list[CatalogCase]:
        """Cases matching ``selection``, each with only its matching series, ordered by
        pseudonym and cut at ``max_cases``. Raises :class:`SelectionRefused` for criteria
        the release policy forbids (``policy=False`` only for the site's own staff)."""
        if policy:
            self.check(selection)
        wanted = set(selection.case_ids) if selection.case_ids is not None else None
        chosen = []
        for case in self.cases():
            if wanted is not None and case.case_id not in wanted:
                continue
            if not all(name in case.attributes and _same(case.attributes[name], value)
                       for name, value in selection.attributes.items()):
                continue
            series = [s for s in case.series if _series_matches(s, selection)]
            if series:
                chosen.append(CatalogCase(case.case_id, series, case.attributes))
        return chosen[: selection.max_cases] if selection.max_cases else chosen

    def count(self, selection: CohortSelection) -> int:
        return len(self.select(selection))

    def instance_digests(self, series_id: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT digest FROM instances WHERE series_id=? ORDER BY digest",
                (series_id,))]

    def exclusions(self, source: str | None = None) -> list[Exclusion]:
        """Inputs that did not enter the store (excluded, or duplicates of one that did),
        and stored ones screening asked a person to review (status ``stored``)."""
        query = ("SELECT source, ref, status, reason, seen_at FROM inputs WHERE (status != "
                 "'stored' OR reason IS NOT NULL)" + (" AND source=?" if source else "")
                 + " ORDER BY source, ref")
        with self._lock:
            rows = self._db.execute(query, (source,) if source else ()).fetchall()
        return [Exclusion(*row) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            one = self._db.execute
            return {
                "cases": one("SELECT COUNT(*) FROM cases").fetchone()[0],
                "studies": one("SELECT COUNT(*) FROM studies").fetchone()[0],
                "series": one("SELECT COUNT(*) FROM series").fetchone()[0],
                "instances": one("SELECT COUNT(*) FROM instances").fetchone()[0],
                "excluded": one("SELECT COUNT(*) FROM inputs WHERE status='excluded'"
                                ).fetchone()[0],
                "duplicates": one("SELECT COUNT(*) FROM inputs WHERE status='duplicate'"
                                  ).fetchone()[0],
            }

    def snapshot(self) -> dict[str, list[tuple]]:
        """The de-identified content as plain rows (for comparisons and exports)."""
        with self._lock:
            return {table: self._db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                    for table in ("studies", "series", "instances", "attributes")} | {
                "cases": self._db.execute("SELECT case_id FROM cases ORDER BY 1").fetchall()}
