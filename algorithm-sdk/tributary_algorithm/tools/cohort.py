"""Local cohort runs: a folder of cases (as ``examples/synthetic_ct/generate.py`` writes
it, or a hospital export) is ingested the way a spoke ingests its sources, with the
spoke's own de-identification engine and catalog from ``tributary-spoke``, so each case
is one patient and the algorithm sees exactly the de-identified files a spoke would mount.

The spoke package is imported only here and only when a cohort is run: the SDK itself
stays standard-library only."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._proc import ToolError
from .localrun import LocalParticipant, participant_for_series

#: The spoke's file of case attributes, kept out of the DICOM inputs (docs/data.md).
ATTRIBUTES_FILE = "attributes.csv"
NOT_A_COHORT = (
    "a cohort folder holds one folder per case (as examples/synthetic_ct/generate.py or a "
    "PACS export writes it); for the series of a single case use --dicom")


@dataclass
class CohortCase:
    """One patient's case, de-identified, with the series folders a spoke would mount."""

    case_id: str
    local: LocalParticipant
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedCohort:
    cases: list[CohortCase]
    #: How the copies were made, to say so: the engine, its profile and options.
    engine: str
    #: (file, reason) of every input that did not become part of a case.
    excluded: list[tuple[str, str]]
    workdir: Path


def _files_directly_in(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]


def check_cohort_folder(cohort_dir: Path) -> None:
    """Refuse what is clearly not a folder of cases, before spending time on it."""
    if not cohort_dir.is_dir():
        raise ToolError(f"{cohort_dir} is not a folder")
    subfolders = [p for p in cohort_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    dicom_here = [p for p in _files_directly_in(cohort_dir)
                  if p.suffix.lower() in ("", ".dcm", ".dicom", ".ima")]
    if not subfolders:
        what = (f"holds {len(dicom_here)} image file(s) directly and no case folders"
                if dicom_here else "holds no case folders")
        raise ToolError(f"{cohort_dir} {what}: {NOT_A_COHORT}")


def prepare_cohort(cohort_dir: Path, workdir: Path | None = None) -> PreparedCohort:
    """Ingest ``cohort_dir`` into a spoke store under ``workdir`` (a temporary folder by
    default; the caller removes it) and return its cases, one per patient."""
    cohort_dir = Path(cohort_dir).resolve()
    check_cohort_folder(cohort_dir)
    try:
        importlib.import_module("tributary.spoke.ingest")
    except ImportError as exc:
        raise ToolError(
            "--cohort de-identifies every case with the spoke's own engine, from the "
            f"tributary-spoke package, which cannot be imported here ({exc}). Install it "
            "(pip install -e spoke/ in a Tributary checkout) or test one case with --dicom."
        ) from None
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tributary-cohort-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _ingested(cohort_dir, work)
    except BaseException:
        if workdir is None:  # ours: nothing is left behind
            shutil.rmtree(work, ignore_errors=True)
        raise


def _ingested(cohort_dir: Path, work: Path) -> PreparedCohort:
    from tributary.spoke.config import SpokeConfig
    from tributary.spoke.ingest import ingest, open_catalog, series_folders

    has_attributes = (cohort_dir / ATTRIBUTES_FILE).is_file()
    config = SpokeConfig(
        spoke_id="local-test", data_dir=cohort_dir, work_dir=work,
        hub_public_key=work / "no-hub.pub",  # never read: nothing here talks to a hub
        policy={"attributes_file": ATTRIBUTES_FILE if has_attributes else None},
        catalog={"workers": max(1, min(4, (os.cpu_count() or 1) - 1))},
    )
    spoke_log = logging.getLogger("tributary.spoke")
    level = spoke_log.level
    spoke_log.setLevel(logging.ERROR)  # exclusions are reported below, once, in a sentence
    try:
        report = ingest(config)
    except Exception as exc:  # a spoke would refuse to run on a store it cannot build
        raise ToolError(f"ingesting {cohort_dir} like a spoke failed: "
                        f"{type(exc).__name__}: {exc}") from None
    finally:
        spoke_log.setLevel(level)
    with open_catalog(config) as catalog:
        profile = catalog.deid_profile() or "?"
        catalog_cases = catalog.cases()
        excluded = [(e.ref, e.reason) for e in catalog.exclusions() if e.status != "stored"]
    options = config.deidentification.model_dump()
    enabled = sorted(k for k, v in options.items() if v is True)
    engine = (f"de-identified by the spoke's own engine (tributary.spoke.deid, profile "
              f"{profile}; options: {', '.join(enabled) or 'none'}): "
              f"{report.stored} instance(s) stored")
    cases = []
    for case in catalog_cases:
        folders = series_folders(config, [s.series_id for s in case.series])
        local = participant_for_series([folders[s.series_id] for s in case.series],
                                       case.case_id)
        cases.append(CohortCase(case.case_id, local, dict(case.attributes)))
    if not cases:
        reasons = "; ".join(f"{ref}: {why}" for ref, why in excluded[:5])
        raise ToolError(f"no case in {cohort_dir}: no file became a de-identified instance"
                        + (f" ({reasons})" if reasons else "") + f". {NOT_A_COHORT}")
    return PreparedCohort(cases, engine, excluded, work)
