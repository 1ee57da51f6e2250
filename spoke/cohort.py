"""Finding the cases in the spoke's data folder. Each sub-folder of ``data_dir`` is a case;
its DICOM files are grouped into series by SeriesInstanceUID, whatever the file layout.
Unreadable files are reported, never silently skipped."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from tributary.protocol.messages import CohortSelection
from tributary.spoke.pseudonyms import Pseudonymizer

log = logging.getLogger(__name__)


@dataclass
class SourceSeries:
    series_uid: str
    series_id: str
    modality: str
    files: list[Path]
    rows: int | None = None
    columns: int | None = None
    body_part: str | None = None


@dataclass
class SourceCase:
    case_id: str
    folder: Path
    series: list[SourceSeries]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def modalities(self) -> set[str]:
        return {s.modality for s in self.series}


def _scan_case(folder: Path, pseudonyms: Pseudonymizer) -> SourceCase:
    series: dict[str, SourceSeries] = {}
    unreadable: list[tuple[Path, str]] = []
    patient_ids: set[str] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            unreadable.append((path, f"{type(exc).__name__}: {exc}"[:200]))
            continue
        patient_ids.add(str(ds.get("PatientID", "")))
        entry = series.get(uid)
        if entry is None:
            entry = series[uid] = SourceSeries(
                series_uid=uid, series_id=pseudonyms.series_id(uid),
                modality=str(ds.get("Modality", "OT")), files=[],
                rows=ds.get("Rows"), columns=ds.get("Columns"),
                body_part=ds.get("BodyPartExamined") or None,
            )
        entry.files.append(path)
    for _path, reason in unreadable:
        log.warning("excluded unreadable file in case folder %s: %s", folder.name, reason)
    # The case pseudonym derives from the patient identifier when there is exactly one,
    # so the same patient links up across submissions; otherwise from the folder.
    source = f"patient:{patient_ids.pop()}" if len(patient_ids) == 1 else f"folder:{folder.name}"
    return SourceCase(case_id=pseudonyms.case_id(source), folder=folder,
                      series=sorted(series.values(), key=lambda s: s.series_id),
                      unreadable=unreadable)


def discover(data_dir: Path, pseudonyms: Pseudonymizer) -> list[SourceCase]:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {data_dir} does not exist")
    cases = [_scan_case(folder, pseudonyms)
             for folder in sorted(p for p in data_dir.iterdir() if p.is_dir())]
    return sorted((c for c in cases if c.series), key=lambda c: c.case_id)


def select(cases: list[SourceCase], selection: CohortSelection) -> list[SourceCase]:
    chosen = [c for c in cases
              if (selection.modality is None or selection.modality in c.modalities)
              and (selection.case_ids is None or c.case_id in selection.case_ids)]
    return chosen[: selection.max_cases] if selection.max_cases else chosen


def load_attributes(data_dir: Path, attributes_file: str | None) -> dict[str, dict[str, Any]]:
    """Site-held case attributes (labels, ground truth), keyed by case folder name."""
    if not attributes_file:
        return {}
    path = data_dir / attributes_file
    if not path.exists():
        log.warning("attributes file %s not found; no attributes can be released", path)
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} must map case folders to attribute objects")
    return data


def released_attributes(case: SourceCase, attributes: dict[str, dict[str, Any]],
                        requested: list[str], releasable: list[str]) -> dict[str, Any]:
    """Only attributes the study asked for AND the site's policy allows ever leave."""
    mine = attributes.get(case.folder.name, {})
    return {k: mine[k] for k in requested if k in releasable and k in mine}


def refused_attributes(requested: list[str], releasable: list[str]) -> list[str]:
    """Attributes a study asked for that this site's policy never releases."""
    return [k for k in dict.fromkeys(requested) if k not in releasable]
