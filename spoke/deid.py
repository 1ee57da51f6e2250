"""De-identification of a case before any algorithm sees it, following the DICOM PS3.15
Annex E Basic Application Level Confidentiality Profile. The action table comes from the
maintained ``dicom-anonymizer`` package (edition recorded in :data:`PROFILE`), private tags
are removed, UIDs are replaced by keyed, repeatable UIDs and the patient becomes the case
pseudonym. Each case is de-identified once into the spoke's work folder and reused."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from dicomanonymizer import simpledicomanonymizer as anonymizer
from pydicom.dataset import Dataset

from tributary.spoke.cohort import SourceCase
from tributary.spoke.pseudonyms import Pseudonymizer

TABLE_EDITION = "dicomfields_2026c"
PROFILE = f"PS3.15 E.1 Basic Profile ({TABLE_EDITION}), private tags removed"
DEID_METHOD = f"Tributary PS3.15 Basic Profile ({TABLE_EDITION})"  # LO: 64 chars
_MARKER = "deid.json"

_base_actions: dict[Any, Callable[..., None]] | None = None


def _actions(pseudonyms: Pseudonymizer) -> dict[Any, Callable[..., None]]:
    global _base_actions
    if _base_actions is None:
        _base_actions = anonymizer.initialize_actions(TABLE_EDITION)
        tables = anonymizer.dicom_anonymization_database_selector(TABLE_EDITION)
        _base_actions["_uid_tags"] = tables["U_TAGS"]  # type: ignore[index]
    actions = {k: v for k, v in _base_actions.items() if k != "_uid_tags"}

    def keyed_uid(dataset: Dataset, tag: Any) -> None:
        element = dataset.get(tag)
        if element is None or not element.value:
            return
        if element.VM > 1:
            element.value = [pseudonyms.uid(str(v)) for v in element.value]
        else:
            element.value = pseudonyms.uid(str(element.value))

    for tag in _base_actions["_uid_tags"]:  # type: ignore[union-attr]
        actions[tag] = keyed_uid
    return actions


def deidentify_dataset(ds: Dataset, case_id: str, pseudonyms: Pseudonymizer) -> None:
    actions = _actions(pseudonyms)
    anonymizer.anonymize_dataset(ds, None, True, lambda: dict(actions))
    ds.PatientID = case_id
    ds.PatientName = case_id
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEID_METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]


def deidentified_case(case: SourceCase, work_dir: Path,
                      pseudonyms: Pseudonymizer) -> dict[str, Path]:
    """Return series_id -> folder of de-identified files, creating them on first use."""
    target = work_dir / "deid" / case.case_id
    marker = target / _MARKER
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded.get("profile") == PROFILE and set(recorded["series"]) == {
                s.series_id for s in case.series}:
            return {sid: target / sid for sid in recorded["series"]}
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{case.case_id}-", dir=target.parent))
    try:
        for series in case.series:
            out = staging / series.series_id
            out.mkdir()
            for index, path in enumerate(series.files, start=1):
                ds = pydicom.dcmread(path)
                deidentify_dataset(ds, case.case_id, pseudonyms)
                ds.save_as(out / f"{index:05d}.dcm", enforce_file_format=True)
        (staging / _MARKER).write_text(json.dumps(
            {"profile": PROFILE, "series": [s.series_id for s in case.series]}))
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {s.series_id: target / s.series_id for s in case.series}
