"""The de-identified store: every accepted instance is screened and de-identified exactly
once, and its de-identified bytes are kept under their SHA-256 (content addressed), so
re-ingesting the same input writes nothing and every experiment reuses the same files.

Each series also has a folder of hard links to its objects (``series/<series_id>/``):
that folder is what a container mounts read-only, so an algorithm only ever sees the store.

:class:`Preparer` is the ONE place that calls screening and de-identification
(``tributary.spoke.deid``); nothing else depends on how they work."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from tributary.spoke.deid import Deidentifier, DeidOptions, FileVerdict, Screener
from tributary.spoke.pseudonyms import Pseudonymizer


class Excluded(Exception):
    """An input that must not enter the store; ``reason`` says why, for the data steward."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PreparedInstance:
    """One de-identified instance, ready to store, with the catalog's metadata."""

    case_id: str
    study_id: str
    series_id: str
    instance_uid: str  # de-identified SOP Instance UID (keyed, stable)
    data: bytes  # the de-identified DICOM file
    metadata: dict[str, Any] = field(default_factory=dict)
    pixel_digest: str | None = None  # BLAKE2b of the pixel data: same image, other header
    review: str | None = None  # screening findings that ask a person to look, not exclude

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


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

    def __init__(self, pseudonyms: Pseudonymizer, options: DeidOptions | None = None) -> None:
        self.pseudonyms = pseudonyms
        self.deidentifier = Deidentifier(pseudonyms, options)
        self.screener = Screener(self.deidentifier.options, pseudonyms)

    @property
    def profile(self) -> str:
        """The profile and options this preparer applies, as custody records state it."""
        return self.deidentifier.profile

    def from_file(self, path: Path) -> PreparedInstance:
        """Screen, read and de-identify a local file; raises :class:`Excluded`."""
        return self._screened(path)

    def from_dataset(self, ds: Dataset, ref: str) -> PreparedInstance:
        """The same for an instance retrieved from a PACS (screened as its file bytes)."""
        buffer = io.BytesIO()
        try:
            ds.save_as(buffer, enforce_file_format=True)
        except Exception as exc:
            raise Excluded(f"corrupted: cannot be written as a DICOM file: "
                           f"{type(exc).__name__}: {exc}"[:300]) from exc
        return self._screened(_NamedBuffer(buffer.getvalue(), ref))

    def _screened(self, source: Path | io.BytesIO) -> PreparedInstance:
        ds, verdict = self.screener.check(source)  # type: ignore[arg-type]
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
        pixels = ds.get("PixelData")
        pixel_digest = hashlib.blake2b(bytes(pixels), digest_size=32).hexdigest() \
            if pixels else None
        try:
            self.deidentifier.deidentify(ds, case_id)
            data = _file_bytes(ds)
        except Exception as exc:  # the engine refused the content: keep a reason, go on
            raise Excluded(f"deidentification-failed: {type(exc).__name__}: {exc}"[:300]
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
                                data=data, metadata=metadata, pixel_digest=pixel_digest,
                                review=review)


def _removals(deidentifier: Deidentifier) -> str | None:
    parts = []
    if deidentifier.removed_unknown:
        parts.append("unknown-attributes-removed: " + ", ".join(deidentifier.removed_unknown))
    if deidentifier.removed_undecodable:
        parts.append("undecodable-un-removed: " + ", ".join(deidentifier.removed_undecodable))
    return "; ".join(parts) or None


def _file_bytes(ds: Dataset) -> bytes:
    """Serialise with a file meta group rebuilt from the dataset alone, so the bytes do not
    depend on where the instance came from (a folder or a PACS)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class DeidStore:
    """Content-addressed files under ``<work_dir>/store``; writes are atomic renames."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "series").mkdir(parents=True, exist_ok=True)

    def object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / f"{digest}.dcm"

    def series_dir(self, series_id: str) -> Path:
        return self.root / "series" / series_id

    def put(self, instance: PreparedInstance) -> str:
        """Store the instance (no-op if its bytes are already there); return its digest."""
        digest = instance.digest
        target = self.object_path(digest)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(instance.data)
                os.chmod(tmp, 0o444)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        self.link(instance.series_id, digest)
        return digest

    def link(self, series_id: str, digest: str) -> None:
        folder = self.series_dir(series_id)
        folder.mkdir(exist_ok=True)
        view = folder / f"{digest}.dcm"
        if not view.exists():
            os.link(self.object_path(digest), view)
