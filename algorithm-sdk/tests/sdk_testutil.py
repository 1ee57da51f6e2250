"""Helpers for the SDK tests (a uniquely named module, so it never clashes with the
platform's own test helpers when both suites run in one pytest session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SDK_ROOT = Path(__file__).resolve().parents[1]
CASE_ID = "c-0123456789abcdef"
SERIES_ID = "s-fedcba9876543210"


def participant_for(series_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A valid participant object whose one series lives at ``series_dir``."""
    participant: dict[str, Any] = {
        "contract_version": "1.0",
        "case_id": CASE_ID,
        "experiment_id": "exp-1",
        "series": [
            {
                "series_id": SERIES_ID,
                "modality": "CT",
                "path": str(series_dir),
                "instance_count": 2,
                "rows": 4,
                "columns": 4,
                "body_part": None,
            }
        ],
    }
    participant.update(overrides)
    return participant


def run_python(
    script: str, env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """Run a script in a fresh interpreter that imports the SDK from this checkout."""
    path = tmp_path / "algorithm.py"
    path.write_text(script)
    full_env = {k: v for k, v in os.environ.items() if k not in ("ALGO_ARG",)}
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(SDK_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, str(path)], env=full_env, capture_output=True, text=True, timeout=60
    )


def write_ct_slice(path: Path, modality: str = "CT", rows: int = 8, columns: int = 6) -> None:
    """Write one small DICOM image (needs pydicom and numpy)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = "DOE^JANE"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((rows, columns), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
