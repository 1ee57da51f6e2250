"""Keyed pseudonyms. The key is generated at the spoke and never leaves it; the same source
identifier always maps to the same pseudonym, so repeated studies link up at this site
while nobody without the key can reverse or recompute them."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from pydicom.uid import generate_uid


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("pseudonym key must be at least 32 bytes")
        self._key = key[:64]

    @classmethod
    def from_key_file(cls, path: Path) -> Pseudonymizer:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
        return cls(path.read_bytes())

    def _digest(self, domain: str, value: str, size: int = 8) -> str:
        return hashlib.blake2b(f"{domain}\0{value}".encode(), key=self._key,
                               digest_size=size).hexdigest()

    def case_id(self, source: str) -> str:
        return "c-" + self._digest("case", source)

    def series_id(self, series_uid: str) -> str:
        return "s-" + self._digest("series", series_uid)

    def identifier(self, value: str, length: int = 16) -> str:
        """A keyed stand-in for an identifier (accession number, study ID...), at most
        ``length`` characters so it fits the attribute's VR."""
        return self._digest("id", value, 16)[:length].upper()

    def date_shift_days(self, case_id: str) -> int:
        """The per-patient date shift: between 1 and 3652 days into the past, the same for
        every instance and every run of the same case (so intervals survive), different
        across patients."""
        return -(1 + int(self._digest("date-shift", case_id), 16) % 3652)

    def uid(self, uid: str) -> str:
        """A new DICOM UID derived from the old one, the same on every run."""
        return generate_uid(entropy_srcs=[self._digest("uid", uid, 32)])
