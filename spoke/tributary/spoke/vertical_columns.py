"""Where a vertical study's columns come from at a spoke: the case attributes the site
supplies in its ``policy.attributes_file`` (keyed by the institution's patient ID), under
the same case pseudonym the catalog gives that patient, whether or not the patient has
images here: a clinical site may hold a registry and no DICOM. Read inside the spoke only;
the allowlist (``[training] vertical_attributes``) decides which may be used."""

from __future__ import annotations

from typing import Any

from tributary.spoke.config import SpokeConfig
from tributary.spoke.ingest import load_attributes
from tributary.spoke.pseudonyms import Pseudonymizer


def site_attributes(config: SpokeConfig) -> dict[str, dict[str, Any]]:
    """Case id -> the case's attributes, read afresh from the attributes file."""
    path = config.attributes_path
    if path is None or not path.exists():
        return {}
    pseudonyms = Pseudonymizer.from_key_file(config.work_dir / "pseudonym.key")
    return {pseudonyms.case_id(f"patient:{patient}"): values
            for patient, values in load_attributes(path).items()}
