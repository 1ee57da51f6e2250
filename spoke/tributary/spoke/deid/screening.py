"""What must not be de-identified and passed on, and what a person should look at: each
file gets a verdict with its reasons, each series an integrity check, identical pixel data
under different headers is caught. Nothing is dropped without a reason in the report."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable
from enum import StrEnum
from itertools import pairwise
from pathlib import Path
from typing import Literal

import pydicom
from pydantic import BaseModel, Field
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from tributary.spoke.deid.inputs import NotRegular, open_input
from tributary.spoke.deid.options import DeidOptions, PixelMask
from tributary.spoke.deid.pixels import PixelCleaningError, clean_pixels
from tributary.spoke.deid.text_detection import (
    TextDetectionError,
    TextRegion,
    detect_text,
    should_scan,
)
from tributary.spoke.pseudonyms import Pseudonymizer

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float
_UNDEFINED = 0xFFFFFFFF


class Reason(StrEnum):
    NOT_DICOM = "not-dicom"
    NOT_REGULAR = "not-a-regular-file"  # FIFO, device, socket, link out of the folder
    UNREADABLE = "unreadable"
    TRUNCATED = "truncated"
    CORRUPTED = "corrupted"
    SCREEN_CAPTURE = "screen-capture"
    BURNED_IN_ANNOTATION = "burned-in-annotation"
    DUPLICATE_PIXELS = "duplicate-pixels"
    SECONDARY_CAPTURE = "secondary-capture"
    DERIVED_IMAGE = "derived-image"
    DEIDENTIFICATION_FAILED = "deidentification-failed"
    PIXELS_CLEANED = "pixels-cleaned"
    BURNED_IN_TEXT = "burned-in-text"
    TEXT_CLEANED = "burned-in-text-cleaned"
    TEXT_DETECTION_FAILED = "text-detection-failed"
    UID_COLLISION = "uid-collision"  # another input has its SOP Instance UID
    DUPLICATE_INSTANCE = "duplicate-instance"  # the same instance as another input


#: Reasons that keep a file out; the others only ask for a person's review.
EXCLUDING = frozenset({Reason.NOT_DICOM, Reason.NOT_REGULAR, Reason.UNREADABLE,
                       Reason.TRUNCATED, Reason.CORRUPTED,
                       Reason.SCREEN_CAPTURE, Reason.BURNED_IN_ANNOTATION,
                       Reason.DUPLICATE_PIXELS, Reason.DEIDENTIFICATION_FAILED,
                       Reason.BURNED_IN_TEXT, Reason.TEXT_DETECTION_FAILED,
                       Reason.UID_COLLISION, Reason.DUPLICATE_INSTANCE})


class Finding(BaseModel):
    reason: Reason
    detail: str


class FileVerdict(BaseModel):
    path: str
    status: Literal["ok", "flagged", "excluded"] = "ok"
    findings: list[Finding] = Field(default_factory=list)
    series_id: str | None = None
    text_regions: list[TextRegion] = Field(default_factory=list, description=(
        "Where OCR found burned-in text (excluded, or blanked under Clean Pixel Data)."))

    @property
    def excluded(self) -> bool:
        return self.status == "excluded"

    def add(self, reason: Reason, detail: str) -> None:
        self.findings.append(Finding(reason=reason, detail=detail))
        if reason in EXCLUDING:
            self.status = "excluded"
        elif self.status == "ok":
            self.status = "flagged"


class SeriesIntegrity(BaseModel):
    series_id: str
    files: int
    complete: bool
    missing_instance_numbers: list[int] = Field(default_factory=list)
    repeated_instance_numbers: list[int] = Field(default_factory=list)
    slice_gaps: list[str] = Field(default_factory=list, description=(
        "Positions along the slice normal (mm) between which slices are missing."))


class ScreeningReport(BaseModel):
    files: list[FileVerdict]
    series: list[SeriesIntegrity]

    def excluded(self) -> list[FileVerdict]:
        return [f for f in self.files if f.status == "excluded"]

    def flagged(self) -> list[FileVerdict]:
        return [f for f in self.files if f.status == "flagged"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for verdict in self.files:
            for finding in verdict.findings:
                out[finding.reason.value] = out.get(finding.reason.value, 0) + 1
        return out


class SlicePlace(BaseModel):
    """Where a screened image sits in its series, for the series' integrity check."""

    instance: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None


class Screener:
    """Checks files one by one (each read once, and handed back for de-identification)
    and accumulates what only a whole series or the whole batch shows."""

    def __init__(self, options: DeidOptions | None = None,
                 pseudonyms: Pseudonymizer | None = None, *,
                 hash_pixels: bool = True) -> None:
        """``hash_pixels=False``: the caller finds identical pixel data itself, from the
        digest the writer computes anyway (:meth:`seen_pixels`), so pixels are hashed
        once per file."""
        self.options = options or DeidOptions()
        self.pseudonyms = pseudonyms
        self.hash_pixels = hash_pixels
        self.verdicts: list[FileVerdict] = []
        self._pixels: dict[bytes | str, str] = {}
        self._series: dict[str, list[SlicePlace]] = {}
        self._placed: dict[int, tuple[str, SlicePlace]] = {}

    def check(self, path: Path, root: Path | None = None
              ) -> tuple[Dataset | None, FileVerdict]:
        """Read and screen one file: the dataset (to de-identify) unless excluded. Only a
        regular file is read (:mod:`tributary.spoke.deid.inputs`); a symbolic link is
        followed only inside ``root``, the input folder."""
        verdict = FileVerdict(path=str(path))
        self.verdicts.append(verdict)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if isinstance(path, str | os.PathLike):
                    with open_input(Path(path), root) as handle:
                        ds = pydicom.dcmread(handle)
                else:  # an instance in memory
                    ds = pydicom.dcmread(path)
            except NotRegular as exc:
                verdict.add(Reason.NOT_REGULAR, str(exc))
                return None, verdict
            except InvalidDicomError as exc:
                verdict.add(Reason.NOT_DICOM, f"no DICOM preamble or header: {exc}"[:300])
                return None, verdict
            except OSError as exc:
                verdict.add(Reason.UNREADABLE, f"{type(exc).__name__}: {exc}"[:300])
                return None, verdict
            except Exception as exc:  # pydicom raises many types on damaged data
                verdict.add(Reason.CORRUPTED, f"{type(exc).__name__}: {exc}"[:300])
                return None, verdict
        problem = _truncation(ds, [str(w.message) for w in caught])
        if problem:
            verdict.add(Reason.TRUNCATED, problem)
            return None, verdict
        self._inspect(ds, verdict)
        return (None if verdict.excluded else ds), verdict

    def check_dataset(self, ds: Dataset, name: str) -> FileVerdict:
        """Screen a dataset that is already in memory (read elsewhere, or received);
        ``name`` identifies it in the report."""
        verdict = FileVerdict(path=name)
        self.verdicts.append(verdict)
        problem = _truncation(ds, [])
        if problem:
            verdict.add(Reason.TRUNCATED, problem)
        else:
            self._inspect(ds, verdict)
        return verdict

    def _inspect(self, ds: Dataset, verdict: FileVerdict) -> None:
        try:
            sop_class, series_uid = UID(ds.SOPClassUID), str(ds.SeriesInstanceUID)
            str(ds.SOPInstanceUID)
            image_type = [str(v).upper() for v in _list(ds.get("ImageType"))]
            burned_in = str(ds.get("BurnedInAnnotation", "")).upper()
        except Exception as exc:
            verdict.add(Reason.CORRUPTED, f"identity attributes missing or damaged: "
                                          f"{type(exc).__name__}: {exc}"[:300])
            return
        verdict.series_id = (self.pseudonyms.series_id(series_uid) if self.pseudonyms
                             else series_uid)
        if "SCREEN SAVE" in image_type:
            verdict.add(Reason.SCREEN_CAPTURE, "ImageType contains SCREEN SAVE: a screen "
                        "capture may show identifying text anywhere in its pixels")
        mask = self.options.pixel_mask_for(ds)
        if burned_in == "YES" and not self.options.allow_burned_in and mask is None:
            verdict.add(Reason.BURNED_IN_ANNOTATION, "BurnedInAnnotation is YES and no "
                        "pixel mask matches this device (modality, manufacturer, model, "
                        "size)" if self.options.clean_pixel_data else
                        "BurnedInAnnotation is YES and the study does not allow burned-in "
                        "annotation")
        if mask is not None and "SCREEN SAVE" not in image_type:
            verdict.add(Reason.PIXELS_CLEANED, f"{len(mask.regions)} region(s) of a "
                        f"{mask.manufacturer or mask.modality or 'matched'} device layout "
                        "blanked (Clean Pixel Data)")
        if "Secondary Capture" in sop_class.name:
            verdict.add(Reason.SECONDARY_CAPTURE, f"SOP class {sop_class.name}: "
                        "check the pixels for burned-in text before release")
        derived = [v for v in ("DERIVED", "SECONDARY") if v in image_type[:2]]
        if derived:
            verdict.add(Reason.DERIVED_IMAGE, f"ImageType {'/'.join(derived)}: not an "
                        "original acquisition")
        pixels = _pixel_bytes(ds) if self.hash_pixels else None
        if pixels and not verdict.excluded:
            self.seen_pixels(verdict, hashlib.sha256(pixels).hexdigest())
        if not verdict.excluded and should_scan(ds, self.options.text_detection):
            self._read_text(ds, verdict)
        if not verdict.excluded:
            self._place(verdict, _slice(ds))

    def _place(self, verdict: FileVerdict, placed: SlicePlace) -> None:
        self._series.setdefault(verdict.series_id, []).append(placed)
        self._placed[id(verdict)] = (verdict.series_id, placed)

    def hand_over(self, verdict: FileVerdict) -> SlicePlace | None:
        """Forget the file of ``verdict`` (the last checked here) and return where its
        image sits in its series (None when it was not placed): what a worker process
        sends back with the verdict, for the collecting screener's :meth:`adopt`."""
        if self.verdicts and self.verdicts[-1] is verdict:
            self.verdicts.pop()
        placed = self._placed.pop(id(verdict), None)
        if placed is None:
            return None
        self._series[placed[0]].pop()  # placed last, with its verdict
        if not self._series[placed[0]]:
            del self._series[placed[0]]
        return placed[1]

    def adopt(self, verdict: FileVerdict, placed: SlicePlace | None) -> None:
        """Take in a file screened by another screener (a worker process's), in input
        order, as if checked here: the report and the series checks then do not depend
        on how many processes screened."""
        self.verdicts.append(verdict)
        if placed is not None and verdict.series_id is not None and not verdict.excluded:
            self._place(verdict, placed)

    def seen_pixels(self, verdict: FileVerdict, digest: str) -> bool:
        """Record the digest of a file's pixel data; a second file with the same pixels
        under another header is excluded (and leaves its series' integrity check)."""
        first = self._pixels.setdefault(digest, verdict.path)
        if first == verdict.path:
            return False
        verdict.add(Reason.DUPLICATE_PIXELS, f"same pixel data as {first}")
        placed = self._placed.pop(id(verdict), None)
        if placed is not None:
            self._series[placed[0]].remove(placed[1])
        return True

    def _read_text(self, ds: Dataset, verdict: FileVerdict) -> None:
        """OCR the pixels: found text excludes the image, or is blanked in ``ds`` (in
        place, before de-identification) when the study chose Clean Pixel Data."""
        try:
            regions = detect_text(ds)
        except TextDetectionError as exc:
            verdict.add(Reason.TEXT_DETECTION_FAILED, str(exc))
            return
        if not regions:
            return
        verdict.text_regions = regions
        boxes = ", ".join(str(r.box) for r in regions[:20]) + \
            (f" and {len(regions) - 20} more" if len(regions) > 20 else "")
        if not self.options.clean_pixel_data:
            verdict.add(Reason.BURNED_IN_TEXT, f"OCR found {len(regions)} word(s) of text "
                        f"in the pixels at (x, y, width, height) {boxes}; Clean Pixel Data "
                        "would blank them")
            return
        try:
            clean_pixels(ds, PixelMask(regions=tuple(r.box for r in regions)))
        except PixelCleaningError as exc:
            verdict.add(Reason.DEIDENTIFICATION_FAILED, f"text found by OCR at {boxes} "
                        f"could not be blanked: {exc}"[:300])
            return
        verdict.add(Reason.TEXT_CLEANED, f"OCR found {len(regions)} word(s) of text; "
                    f"blanked (Clean Pixel Data) at (x, y, width, height) {boxes}")

    def report(self) -> ScreeningReport:
        return ScreeningReport(files=self.verdicts,
                               series=[_integrity(s, items) for s, items in
                                       sorted(self._series.items())])


def screen_files(paths: Iterable[Path], options: DeidOptions | None = None,
                 pseudonyms: Pseudonymizer | None = None) -> ScreeningReport:
    screener = Screener(options, pseudonyms)
    for path in paths:
        screener.check(path)
    return screener.report()


def _list(value: object) -> list[object]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _truncation(ds: Dataset, messages: list[str]) -> str | None:
    """pydicom reads a cut-off file without an error, so look for the traces it leaves."""
    for message in messages:
        if "End of file" in message or "EOF" in message:
            return f"file ends early: {message}"[:300]
    if ds._dict:
        last = ds._dict[max(ds._dict)]
        if isinstance(last, RawDataElement) and last.length != _UNDEFINED and \
                last.value is not None and len(last.value) < last.length:
            return (f"element {last.tag} declares {last.length} bytes but the file holds "
                    f"{len(last.value)}")
    sop_class = ds.get("SOPClassUID")
    if sop_class is not None and "Image Storage" in UID(sop_class).name and \
            not any(t in ds._dict for t in PIXEL_TAGS):
        return f"{UID(sop_class).name} without pixel data"
    return None


def _pixel_bytes(ds: Dataset) -> bytes | None:
    for tag in PIXEL_TAGS:
        elem = ds._dict.get(tag)  # type: ignore[call-overload]
        if elem is not None and elem.value:
            return bytes(elem.value)
    return None


def _slice(ds: Dataset) -> SlicePlace:
    def floats(name: str, n: int) -> tuple[float, ...] | None:
        try:
            values = tuple(float(v) for v in ds.get(name) or ())
        except (TypeError, ValueError):
            return None
        return values if len(values) == n else None

    try:
        instance = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") is not None \
            else None
    except (TypeError, ValueError):
        instance = None
    position = floats("ImagePositionPatient", 3)
    return SlicePlace(instance=instance, position=position,  # type: ignore[arg-type]
                  orientation=floats("ImageOrientationPatient", 6))


def _integrity(series_id: str, items: list[SlicePlace]) -> SeriesIntegrity:
    numbers = sorted(i.instance for i in items if i.instance is not None)
    missing, repeated = [], sorted({n for n in numbers if numbers.count(n) > 1})
    if numbers:
        missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    gaps = _slice_gaps(items)
    return SeriesIntegrity(series_id=series_id, files=len(items),
                           complete=not (missing or repeated or gaps),
                           missing_instance_numbers=missing[:100],
                           repeated_instance_numbers=repeated[:100], slice_gaps=gaps[:100])


def _slice_gaps(items: list[SlicePlace]) -> list[str]:
    """Distances between neighbouring slices along the slice normal; a step over 1.5x the
    median spacing means slices are missing."""
    placed = [i for i in items if i.position and i.orientation]
    if len(placed) < 3 or len({i.orientation for i in placed}) != 1:
        return []
    r, c = placed[0].orientation[:3], placed[0].orientation[3:]  # type: ignore[index]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    depth = sorted({round(sum(p * n for p, n in zip(i.position, normal, strict=True)), 3)
                    for i in placed})  # type: ignore[arg-type]
    steps = [b - a for a, b in pairwise(depth)]
    if not steps:
        return []
    spacing = sorted(steps)[len(steps) // 2]
    return [f"{a:.2f} -> {b:.2f} (step {b - a:.2f}, spacing {spacing:.2f})"
            for a, b in pairwise(depth) if spacing > 0 and b - a > 1.5 * spacing]
