"""De-identifying a spoke case once into the work folder, for algorithms to read.

Files the screener excludes (screen captures, burned-in annotation, damaged files,
duplicates) never reach the algorithm; the screening report stays beside the case folder,
outside every folder mounted into a container."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tributary.spoke.cohort import SourceCase
from tributary.spoke.deid.engine import Deidentifier
from tributary.spoke.deid.options import DeidOptions
from tributary.spoke.deid.profile import profile_name
from tributary.spoke.deid.screening import Screener
from tributary.spoke.pseudonyms import Pseudonymizer

PROFILE = profile_name(DeidOptions())
ENGINE_VERSION = 2  # bump when output for the same profile changes
_MARKER = "deid.json"
SCREENING = "screening.json"


def deidentified_case(case: SourceCase, work_dir: Path, pseudonyms: Pseudonymizer,
                      options: DeidOptions | None = None) -> dict[str, Path]:
    """Return series_id -> folder of de-identified files, creating them on first use."""
    deid = Deidentifier(pseudonyms, options)
    target = work_dir / "deid" / case.case_id
    marker = target / _MARKER
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded.get("profile") == deid.profile and recorded.get(
                "engine") == ENGINE_VERSION and set(recorded["series"]) == {
                s.series_id for s in case.series}:
            return {sid: target / sid for sid in recorded["series"]}
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{case.case_id}-", dir=target.parent))
    screener = Screener(deid.options, pseudonyms)
    try:
        for series in case.series:
            out = staging / series.series_id
            out.mkdir()
            for index, path in enumerate(series.files, start=1):
                ds, _verdict = screener.check(path)
                if ds is None:
                    continue
                deid.deidentify(ds, case.case_id)
                ds.save_as(out / f"{index:05d}.dcm", enforce_file_format=True)
        (staging / SCREENING).write_text(screener.report().model_dump_json(indent=1))
        (staging / _MARKER).write_text(json.dumps(
            {"profile": deid.profile, "engine": ENGINE_VERSION,
             "series": [s.series_id for s in case.series]}))
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {s.series_id: target / s.series_id for s in case.series}
