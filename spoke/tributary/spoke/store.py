"""The de-identified store: every accepted instance is screened and de-identified exactly
once, and its de-identified bytes are kept under their SHA-256 (content addressed), so
re-ingesting the same input writes nothing and every experiment reuses the same files.

Each series also has a folder of hard links to its objects (``series/<series_id>/``):
that folder is what a container mounts read-only, so an algorithm only ever sees the store.

:class:`Preparer` is the ONE place that calls screening and de-identification
(``tributary.spoke.deid``); nothing else depends on how they work."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydicom.dataset import Dataset

from tributary.spoke.deid import Deidentifier, DeidOptions, FileVerdict, Screener
from tributary.spoke.deid.output import encode, write_new
from tributary.spoke.pseudonyms import Pseudonymizer


class Excluded(Exception):
    """An input that must not enter the store; ``reason`` says why, for the data steward."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PreparedInstance:
    """One de-identified instance, written (staged) or held in memory, with the catalog's
    metadata: what a worker sends back is this, never the file's bytes."""

    case_id: str
    study_id: str
    series_id: str
    instance_uid: str  # de-identified SOP Instance UID (keyed, stable)
    digest: str  # the store's name for the file (``tributary.spoke.deid.output``)
    metadata: dict[str, Any] = field(default_factory=dict)
    pixel_digest: str | None = None  # SHA-256 of the pixel data: same image, other header
    review: str | None = None  # screening findings that ask a person to look, not exclude
    staged: str | None = None  # the written file, not yet in the store (see DeidStore.put)
    content: bytes | None = field(default=None, repr=False)  # when not staged

    @property
    def data(self) -> bytes:
        """The de-identified file's bytes (read back when staged)."""
        if self.content is not None:
            return self.content
        assert self.staged is not None
        return Path(self.staged).read_bytes()


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value is not None else None


def _floats(ds: Dataset, keyword: str) -> list[float] | None:
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    try:
        values = [value] if isinstance(value, str | bytes | int | float) else list(value)
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _findings(verdict: FileVerdict) -> str:
    return "; ".join(f"{f.reason}: {f.detail}" for f in verdict.findings)[:1000]


class _NamedBuffer(io.BytesIO):
    """An in-memory instance the screener reports under its source reference."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self._name = name

    def __str__(self) -> str:
        return self._name


class Preparer:
    """The ONE adapter to screening and de-identification (``tributary.spoke.deid``): one
    per ingest run (or worker process), since the engine caches its compiled action table
    and the screener remembers pixel data it has seen in the run."""

    def __init__(self, pseudonyms: Pseudonymizer, options: DeidOptions | None = None,
                 staging: Path | None = None) -> None:
        """``staging``: a folder (of the store, so a rename moves it in) where each
        prepared file is written once; without it the bytes stay in memory. Identical
        pixel data is found by the caller from ``pixel_digest`` (the catalog, in input
        order, whatever the number of workers), so the screener does not hash pixels."""
        self.pseudonyms = pseudonyms
        self.deidentifier = Deidentifier(pseudonyms, options)
        self.screener = Screener(self.deidentifier.options, pseudonyms, hash_pixels=False)
        self.staging = staging

    @property
    def profile(self) -> str:
        """The profile and options this preparer applies, as custody records state it."""
        return self.deidentifier.profile

    def from_file(self, path: Path, root: Path | None = None) -> PreparedInstance:
        """Screen, read and de-identify a local file (a regular file, or a symbolic link
        inside ``root``, its source folder); raises :class:`Excluded`."""
        return self._screened(path, root)

    def from_dataset(self, ds: Dataset, ref: str) -> PreparedInstance:
        """The same for an instance retrieved from a PACS (screened as its file bytes)."""
        buffer = io.BytesIO()
        try:
            ds.save_as(buffer, enforce_file_format=True)
        except Exception as exc:
            raise Excluded(f"corrupted: cannot be written as a DICOM file: "
                           f"{type(exc).__name__}: {exc}"[:300]) from exc
        return self._screened(_NamedBuffer(buffer.getvalue(), ref))

    def _screened(self, source: Path | io.BytesIO, root: Path | None = None
                  ) -> PreparedInstance:
        ds, verdict = self.screener.check(source, root)  # type: ignore[arg-type]
        if ds is None:
            raise Excluded(_findings(verdict))
        return self._prepare(ds, _findings(verdict) or None)

    def _prepare(self, ds: Dataset, review: str | None) -> PreparedInstance:
        if not _text(ds, "StudyInstanceUID"):
            raise Excluded("corrupted: missing StudyInstanceUID")
        if ds.file_meta.get("TransferSyntaxUID") is None:
            raise Excluded("corrupted: no transfer syntax in the file meta information")
        patient = _text(ds, "PatientID")
        case_source = f"patient:{patient}" if patient else f"study:{ds.StudyInstanceUID}"
        case_id = self.pseudonyms.case_id(case_source)
        series_id = self.pseudonyms.series_id(str(ds.SeriesInstanceUID))
        try:
            self.deidentifier.deidentify(ds, case_id)
            encoded = encode(ds)
        except Exception as exc:  # the engine refused the content: keep a reason, go on
            raise Excluded(f"deidentification-failed: {failure_reason(exc)}"[:300]) from exc
        staged = None
        if self.staging is not None:
            staged = self.staging / f".tmp-{secrets.token_hex(12)}.dcm"
            try:
                write_new(staged, encoded)
            except OSError as exc:
                raise Excluded(f"deidentification-failed: cannot write: {exc}"[:300]
                               ) from exc
        removed = _removals(self.deidentifier)
        if removed:  # the steward's ingest report names each attribute that went
            review = "; ".join(r for r in (review, removed) if r)[:1000]
        metadata = {
            "modality": _text(ds, "Modality") or "OT",
            "body_part": (_text(ds, "BodyPartExamined") or "").upper() or None,
            "series_description": _text(ds, "SeriesDescription"),
            "study_description": _text(ds, "StudyDescription"),
            "rows": int(ds.Rows) if "Rows" in ds else None,
            "columns": int(ds.Columns) if "Columns" in ds else None,
            "pixel_spacing": _floats(ds, "PixelSpacing"),
            "slice_thickness": (_floats(ds, "SliceThickness") or [None])[0],
            "instance_number": int(ds.InstanceNumber) if ds.get("InstanceNumber") else None,
        }
        return PreparedInstance(case_id=case_id, study_id=str(ds.StudyInstanceUID),
                                series_id=series_id, instance_uid=str(ds.SOPInstanceUID),
                                digest=encoded.digest, metadata=metadata,
                                pixel_digest=encoded.pixel_digest, review=review,
                                staged=str(staged) if staged else None,
                                content=None if staged else encoded.data())


def _removals(deidentifier: Deidentifier) -> str | None:
    parts = []
    if deidentifier.removed_unknown:
        parts.append("unknown-attributes-removed: " + ", ".join(deidentifier.removed_unknown))
    if deidentifier.removed_undecodable:
        parts.append("undecodable-un-removed: " + ", ".join(deidentifier.removed_undecodable))
    return "; ".join(parts) or None


def write_format(root: Path) -> None:
    """Mark ``root`` as a store of the current format (atomically)."""
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-format-")
    with os.fdopen(fd, "w") as handle:
        handle.write(STORE_FORMAT.model_dump_json() + "\n")
    os.replace(tmp, root / FORMAT_FILE)


def failure_reason(exc: Exception) -> str:
    """One line: pydicom's writer wraps the cause with a traceback in the message."""
    text = str(exc).split("\n", 1)[0]
    if isinstance(exc, TypeError) and "encoding without a string argument" in str(exc):
        text += (" (the data set is encoded with another VR encoding than its transfer "
                 "syntax declares)")
    return f"{type(exc).__name__}: {text}"[:300]


class StoreFormat(BaseModel):
    """``FORMAT.json`` at the store's root: how its objects are named. A store without it
    but with objects was written before the marker existed, under the old naming (the
    SHA-256 of the whole file, BLAKE2b of the source pixels in the catalog)."""

    version: int
    naming: str


#: Objects named as :mod:`tributary.spoke.deid.output` names them (pixels hashed apart).
STORE_FORMAT = StoreFormat(version=2, naming="sha256-with-pixel-sha256")
FORMAT_FILE = "FORMAT.json"
MIGRATE_COMMAND = "tributary spoke store migrate --config CONFIG"


class StoreFormatError(RuntimeError):
    """The store is in a format this spoke does not use: nothing is read or written."""


def store_format(root: Path) -> StoreFormat | None:
    """The store's format: its marker, the current one for a store with no objects yet,
    None for an unmarked store holding objects (the old naming)."""
    marker = root / FORMAT_FILE
    if marker.exists():
        try:
            return StoreFormat.model_validate_json(marker.read_bytes())
        except ValidationError as exc:
            raise StoreFormatError(f"the de-identified store's {marker} is damaged: "
                                   f"{exc.errors()[0]['msg']}") from None
    objects = root / "objects"
    if objects.is_dir() and any(objects.glob("*/*.dcm")):
        return None
    return STORE_FORMAT


def check_format(root: Path) -> None:
    """Raise :class:`StoreFormatError`, naming what to do, unless the store at ``root``
    is absent, empty, or in the current format."""
    found = store_format(root)
    if found is None:
        raise StoreFormatError(
            f"the de-identified store {root} was written before its format was marked (old "
            f"object naming); convert it once with `{MIGRATE_COMMAND}` (or rebuild it with "
            "`tributary spoke ingest --rebuild`)")
    if found != STORE_FORMAT:
        raise StoreFormatError(
            f"the de-identified store {root} is in format {found.version} ({found.naming}); "
            f"this spoke uses format {STORE_FORMAT.version}: use a matching release")


class DeidStore:
    """Content-addressed files under ``<work_dir>/store``; writes are atomic renames."""

    def __init__(self, root: Path) -> None:
        """Raises :class:`StoreFormatError` for a store of another format: its objects
        would never be found under this format's names, and duplicates would pile up."""
        check_format(root)
        self.root = root
        self._made: set[Path] = set()
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "series").mkdir(parents=True, exist_ok=True)
        if not (root / FORMAT_FILE).exists():
            write_format(root)

    def object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / f"{digest}.dcm"

    def series_dir(self, series_id: str) -> Path:
        return self.root / "series" / series_id

    @property
    def staging(self) -> Path:
        """Where workers write prepared files before :meth:`put` renames them in."""
        return self.root / "objects"

    def clear_staging(self) -> int:
        """Remove files a crashed run left staged (call under the ingest lock)."""
        stale = list(self.staging.glob(".tmp-*"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def put(self, instance: PreparedInstance) -> str:
        """Store the instance (no-op if its bytes are already there); return its digest.
        A staged file is renamed in (or removed, when the object exists): never copied."""
        digest = instance.digest
        target = self.object_path(digest)
        staged = Path(instance.staged) if instance.staged else None
        if target.exists():
            if staged is not None:
                staged.unlink(missing_ok=True)
        else:
            self._folder(target.parent)
            if staged is None:
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
                try:
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(instance.data)
                    os.chmod(tmp, 0o444)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                staged = Path(tmp)
            os.replace(staged, target)
        self.link(instance.series_id, digest, target)
        return digest

    def _folder(self, folder: Path) -> None:
        """Make ``folder`` once per store object: a ``mkdir`` per stored file was a tenth
        of the ingesting process's own work."""
        if folder not in self._made:
            folder.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)

    def discard(self, instance: PreparedInstance) -> None:
        """Drop a staged file that will not enter the store (excluded, duplicate)."""
        if instance.staged:
            Path(instance.staged).unlink(missing_ok=True)

    def link(self, series_id: str, digest: str, target: Path | None = None) -> None:
        """The series folder's link to the object (``target``, when the caller has its
        path); kept when it exists."""
        folder = self.series_dir(series_id)
        self._folder(folder)
        with contextlib.suppress(FileExistsError):
            os.link(target or self.object_path(digest), folder / f"{digest}.dcm")
