"""The case ids a spoke releases to the hub, scoped to one study.

The catalog's pseudonym of a patient (``c-...`` from :mod:`tributary.spoke.pseudonyms`) is
the same in every study, so results carrying it would let the hub join one patient's
results across unrelated studies. Everything that leaves the spoke (results, progress,
custody records, statuses, steward holds) names a case by an id derived with a keyed HMAC
of the study, the site and the catalog case instead: unrelated across studies and sites,
stable within one study (so retries and restarts line up), and not reversible without
the spoke's secret. The mapping back is kept in the spoke's journal and never leaves it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes, hmac

#: Hex digits kept from the HMAC: 96 bits, no collision within any realistic study.
_DIGITS = 24


class ReleasedCaseIds:
    """Derives study-scoped case ids with one spoke secret."""

    def __init__(self, key: bytes, site: str) -> None:
        if len(key) < 32:
            raise ValueError("case id key must be at least 32 bytes")
        self._key, self.site = key, site

    @classmethod
    def from_key_file(cls, path: Path, site: str) -> ReleasedCaseIds:
        """Load the spoke's secret, creating it (readable by the owner only) on first use."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
        return cls(path.read_bytes(), site)

    def released(self, study_id: str, catalog_case_id: str) -> str:
        """The id the hub sees for ``catalog_case_id`` in ``study_id`` at this site."""
        return "c-" + self._mac("case", study_id, catalog_case_id)

    def released_series(self, study_id: str, series_id: str) -> str:
        """The id an algorithm is given for the store's series ``series_id`` in
        ``study_id``: the store's series pseudonym is as stable as the case's, and an
        algorithm that echoes it in its output would link the patient across studies."""
        return "s-" + self._mac("series", study_id, series_id)

    def _mac(self, kind: str, study_id: str, value: str) -> str:
        mac = hmac.HMAC(self._key, hashes.SHA256())
        # JSON framing: no two different (kind, study, site, value) give the same input.
        mac.update(json.dumps([f"tributary-released-{kind}-v1", study_id, self.site,
                               value]).encode())
        return mac.finalize().hex()[:_DIGITS]
