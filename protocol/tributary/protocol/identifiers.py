"""Identifier formats that are checked outside messages too (a spoke's configuration):
their own module, so that checking one does not load every wire message (about a tenth of
a second of a command's start)."""

from __future__ import annotations

import re

SPOKE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


def validate_spoke_id(value: str) -> str:
    if not SPOKE_ID_RE.fullmatch(value):
        raise ValueError("spoke id must be 2-63 lower-case letters, digits or '-'")
    return value
