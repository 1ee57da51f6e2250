"""A spoke's id and its check, in a module that imports nothing else: a spoke's
configuration checks its id without loading the wire protocol's messages (and through
them the signing library and its cloud signers, 0.15 s of CPU), which
``tributary spoke deidentify --config`` never sends. :mod:`tributary.protocol.messages`
re-exports both."""

from __future__ import annotations

import re

# Anchored for JSON schema patterns; applied with fullmatch, since "$" alone would let a
# trailing newline through.
SPOKE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


def validate_spoke_id(value: str) -> str:
    if not SPOKE_ID_RE.fullmatch(value):
        raise ValueError("spoke id must be 2-63 lower-case letters, digits or '-'")
    return value
