"""De-identification of DICOM before anything leaves the source folders: the PS3.15
Annex E Basic Application Level Confidentiality Profile with the options a study
chooses (:class:`DeidOptions`), the engine (:class:`Deidentifier`), screening of what
must be excluded or reviewed (:class:`Screener`, :func:`screen_files`). The spoke's store
(``tributary.spoke.store.Preparer``) is the one place the spoke applies them."""

from __future__ import annotations

from pydicom.dataset import Dataset

from tributary.spoke.deid.engine import DEID_METHOD, Deidentifier
from tributary.spoke.deid.options import DeidOptions, PixelMask, SafePrivate
from tributary.spoke.deid.pixels import PixelCleaningError, clean_pixels
from tributary.spoke.deid.profile import (
    BASIC_EDITION,
    OPTIONS_EDITION,
    action_table,
    profile_name,
)
from tributary.spoke.deid.screening import (
    FileVerdict,
    Finding,
    Reason,
    Screener,
    ScreeningReport,
    SeriesIntegrity,
    screen_files,
)
from tributary.spoke.pseudonyms import Pseudonymizer

__all__ = [
    "BASIC_EDITION", "DEID_METHOD", "OPTIONS_EDITION", "DeidOptions",
    "Deidentifier", "FileVerdict", "Finding", "PixelCleaningError", "PixelMask", "Reason",
    "SafePrivate", "Screener", "ScreeningReport", "SeriesIntegrity", "action_table",
    "clean_pixels", "deidentify_dataset", "profile_name", "screen_files",
]


def deidentify_dataset(ds: Dataset, case_id: str, pseudonyms: Pseudonymizer,
                       options: DeidOptions | None = None) -> Dataset:
    """One-off convenience; reuse a :class:`Deidentifier` for many datasets."""
    return Deidentifier(pseudonyms, options).deidentify(ds, case_id)
