"""The file ``tributary spoke deidentify --report`` writes: what was done to a folder,
with what, and what was left out. A module of its own so that the command's module
imports no pydantic model before the process is started lean
(:func:`tributary.spoke.startup.lean_start`)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class OutputFile(BaseModel):
    source: str
    output: str
    removed_unknown: list[str] = []  # standard-group attributes no dictionary knows
    removed_undecodable: list[str] = []  # UN values that did not decode by their VR


class DeidRunReport(BaseModel):
    """The file written by ``--report``: what was done, with what, and what was left out."""

    profile: str
    options: dict
    source: str
    destination: str
    started: datetime
    finished: datetime
    files_seen: int
    files_written: int
    excluded: int
    flagged: int
    reasons: dict[str, int]
    screening: dict
    outputs: list[OutputFile]
