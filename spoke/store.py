"""The de-identified store: every accepted instance is screened and de-identified exactly
once, and its de-identified bytes are kept under their SHA-256 (content addressed), so
re-ingesting the same input writes nothing and every experiment reuses the same files.

Each series also has a folder of hard links to its objects (``series/<series_id>/``):
that folder is what a container mounts read-only, so an algorithm only ever sees the store.

:func:`prepare_instance` is the ONE place that calls screening and de-identification;
swap its body to change the engine, nothing else depends on how it works."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from tributary.spoke import deid
from tributary.spoke.pseudonyms import Pseudonymizer

#: Recorded in every custody record: which de-identification produced the store's files.
DEID_PROFILE = deid.PROFILE

# SOP classes whose pixels are typically screen captures with burned-in text.
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


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


def _screen(ds: Dataset) -> None:
    """Refuse inputs no algorithm should see. Minimal until the screening engine lands."""
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not _text(ds, keyword):
            raise Excluded(f"missing {keyword}")
    sop_class = _text(ds, "SOPClassUID") or ""
    if sop_class.startswith(_SECONDARY_CAPTURE):
        raise Excluded("secondary capture (screen capture, may carry burned-in identifiers)")
    if (_text(ds, "BurnedInAnnotation") or "").upper() == "YES":
        raise Excluded("BurnedInAnnotation is YES")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise Excluded("no transfer syntax in the file meta information")
    if "PixelData" in ds and not syntax.is_compressed:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        bits = (rows * columns * int(ds.get("SamplesPerPixel") or 1)
                * int(ds.get("NumberOfFrames") or 1) * int(ds.get("BitsAllocated") or 8))
        expected = (bits + 7) // 8
        if len(ds.PixelData) < expected:
            raise Excluded(f"truncated pixel data ({len(ds.PixelData)} of {expected} bytes)")


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


def prepare_instance(ds: Dataset, pseudonyms: Pseudonymizer) -> PreparedInstance:
    """Screen and de-identify one source instance (the adapter to the de-id engine).

    Raises :class:`Excluded` when the instance must not enter the store."""
    _screen(ds)
    patient = _text(ds, "PatientID")
    case_source = f"patient:{patient}" if patient else f"study:{ds.StudyInstanceUID}"
    case_id = pseudonyms.case_id(case_source)
    series_id = pseudonyms.series_id(str(ds.SeriesInstanceUID))
    try:
        deid.deidentify_dataset(ds, case_id, pseudonyms)
        data = _file_bytes(ds)
    except Excluded:
        raise
    except Exception as exc:  # the engine refused the content: keep a reason, go on
        raise Excluded(f"de-identification failed: {type(exc).__name__}: {exc}"[:300]) from exc
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
                            data=data, metadata=metadata)


def read_instance(path: Path) -> Dataset:
    """Read a file as DICOM, or raise :class:`Excluded` with the reason it is not."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        raise Excluded("not a DICOM file (no DICM prefix / file meta header)") from None
    except Exception as exc:
        raise Excluded(f"not readable as DICOM: {type(exc).__name__}: {exc}"[:300]) from exc


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
