"""The one byte form of JSON that is hashed and signed, apart from the signing code, so
that what only hashes (the audit log) does not load a signature library."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any, ascii_only: bool = False) -> bytes:
    """The one byte form hashed and signed: sorted keys, no spaces, UTF-8 (or escaped to
    ASCII, as the audit log's lines are)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only,
                      allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
