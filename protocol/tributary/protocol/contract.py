"""The algorithm contract, version 1.1: what a spoke gives an algorithm container and what
it takes back. Kept deliberately small so an algorithm can be written in any language.

The algorithm SDK (``algorithm-sdk/``) re-states these constants with the standard library
only; ``tests/test_contract.py`` checks both agree, and ``docs/schemas/`` holds the JSON
Schemas generated from the models below.
"""

from __future__ import annotations

import re
from enum import IntEnum, StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

CONTRACT_VERSION = "1.1"

#: Name of the environment variable that carries the JSON-encoded :class:`AlgoArg`.
ALGO_ARG_ENV = "ALGO_ARG"
#: Fixed paths inside the container.
PARTICIPANT_PATH = "/tributary/participant.json"
INPUT_ROOT = "/tributary/input"  # one read-only sub-directory per series
OUTPUT_DIR = "/tributary/output"  # the only writable mount
OUTPUT_PATH = f"{OUTPUT_DIR}/output.json"
#: Optional (contract 1.1): the algorithm may keep a small :class:`Progress` JSON object
#: here; the spoke reads it while the container runs and tells the hub. It never leaves as
#: part of a result and is discarded with the run.
PROGRESS_PATH = f"{OUTPUT_DIR}/progress.json"
#: The spoke ignores progress files larger than this.
PROGRESS_LIMIT_BYTES = 4096
#: Progress leaves a spoke as a fraction rounded to this step (21 values, 0 to 1) and at
#: most one :class:`ProgressStep`: the channel cannot carry data (see docs/security.md).
PROGRESS_FRACTION_STEP = 0.05
#: A spoke sends at most this many progress messages per case attempt, each only when the
#: rounded value changed. With 21 fractions and 11 steps (or none) one message carries
#: less than one byte the algorithm chose, so at most this many bytes per case leave.
MAX_PROGRESS_REPORTS_PER_CASE = 30
SCRATCH_DIR = "/tmp"  # in-memory tmpfs, discarded with the container

#: The spoke refuses output.json files larger than this unless its config says otherwise.
DEFAULT_OUTPUT_LIMIT_BYTES = 1024 * 1024

_PSEUDONYM = re.compile(r"^[a-z]-[0-9a-f]{16,64}$")


class ExitCode(IntEnum):
    """What an algorithm's exit status means to the spoke."""

    SUCCESS = 0  # output.json written and complete
    ERROR = 1  # the algorithm failed (any other non-zero status is treated the same)
    INVALID_ARGUMENTS = 2  # the arguments in ALGO_ARG are not acceptable to this algorithm
    UNSUITABLE_INPUT = 3  # this case cannot be processed by this algorithm (e.g. no CT)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AlgoArg(_Strict):
    """The value of ``ALGO_ARG``: a JSON object, readable from any language."""

    contract_version: str = CONTRACT_VERSION
    arguments: dict = Field(default_factory=dict, description="Algorithm-specific arguments.")
    participant: str = Field(PARTICIPANT_PATH, description="Path of the participant JSON.")
    output: str = Field(OUTPUT_PATH, description="Path where output.json must be written.")


class ParticipantSeries(_Strict):
    """One de-identified series of a case, mounted read-only at ``path``."""

    series_id: str = Field(description="Pseudonymous series identifier (s-…).")
    modality: str = Field(description="DICOM Modality, e.g. CT.")
    path: str = Field(description="Directory inside the container holding the series files.")
    instance_count: int = Field(ge=0)
    rows: int | None = Field(None, ge=0)
    columns: int | None = Field(None, ge=0)
    body_part: str | None = None

    @field_validator("series_id")
    @classmethod
    def _pseudonymous(cls, value: str) -> str:
        if not _PSEUDONYM.match(value):
            raise ValueError("series_id must be a pseudonym like 's-0123456789abcdef'")
        return value

    @field_validator("path")
    @classmethod
    def _under_input_root(cls, value: str) -> str:
        if not value.startswith(INPUT_ROOT + "/"):
            raise ValueError(f"series path must be under {INPUT_ROOT}")
        return value


class Participant(_Strict):
    """The participant JSON: de-identified case metadata. Never a direct identifier."""

    contract_version: str = CONTRACT_VERSION
    case_id: str = Field(description="Pseudonymous case identifier (c-…), stable at one spoke.")
    experiment_id: str
    series: list[ParticipantSeries]

    @field_validator("case_id")
    @classmethod
    def _pseudonymous(cls, value: str) -> str:
        if not _PSEUDONYM.match(value):
            raise ValueError("case_id must be a pseudonym like 'c-0123456789abcdef'")
        return value


class ProgressStep(StrEnum):
    """The only words an algorithm can say about its progress. A fixed vocabulary, not
    free text: progress travels to the hub while the case runs, outside any review, so it
    must not be able to carry patient data or anything else the algorithm read."""

    STARTING = "starting"
    LOADING = "loading"
    PREPROCESSING = "preprocessing"
    SEGMENTING = "segmenting"
    DETECTING = "detecting"
    MEASURING = "measuring"
    CLASSIFYING = "classifying"
    POSTPROCESSING = "postprocessing"
    WRITING = "writing"
    DONE = "done"


def round_fraction(value: float) -> float:
    """``value`` rounded to the nearest :data:`PROGRESS_FRACTION_STEP`."""
    steps = round(value / PROGRESS_FRACTION_STEP)
    return round(steps * PROGRESS_FRACTION_STEP, 2)


#: A progress fraction as it may leave a spoke: 0 to 1, rounded to the step.
RoundedFraction = Annotated[float, Field(ge=0.0, le=1.0), AfterValidator(round_fraction)]


class Progress(_Strict):
    """The optional progress file: how far the algorithm is with this case. Replace it
    atomically (write a temporary file in the same directory, then rename)."""

    fraction: RoundedFraction = Field(
        description="Share of the work done, 0 to 1; rounded to 0.05 when read.")
    message: ProgressStep | None = Field(
        None, description="The step the algorithm is at, from a fixed vocabulary.")
