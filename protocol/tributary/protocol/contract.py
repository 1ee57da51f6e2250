"""The algorithm contract, version 1.1: what a spoke gives an algorithm container and what
it takes back. Kept deliberately small so an algorithm can be written in any language.

The constants (paths, limits, exit codes) come from the algorithm SDK
(``tributary_algorithm.contract``), which defines them with the standard library only; this
module adds the pydantic models the platform validates with, and ``docs/schemas/`` holds the
JSON Schemas generated from them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# The contract's constants are defined once, by the algorithm SDK (standard library only,
# so an algorithm image needs nothing else); the platform uses the very same values.
from tributary_algorithm.contract import (
    ALGO_ARG_ENV,
    CONTRACT_VERSION,
    DEFAULT_OUTPUT_LIMIT_BYTES,
    INPUT_ROOT,
    MAX_PROGRESS_REPORTS_PER_CASE,
    OUTPUT_DIR,
    OUTPUT_PATH,
    PARTICIPANT_PATH,
    PROGRESS_FRACTION_STEP,
    PROGRESS_LIMIT_BYTES,
    PROGRESS_PATH,
    PROGRESS_STEPS,
    PSEUDONYM_PATTERN,
    SCRATCH_DIR,
    ExitCode,
)

__all__ = [
    "ALGO_ARG_ENV", "CONTRACT_VERSION", "DEFAULT_OUTPUT_LIMIT_BYTES", "INPUT_ROOT",
    "MAX_PROGRESS_REPORTS_PER_CASE", "OUTPUT_DIR", "OUTPUT_PATH", "PARTICIPANT_PATH",
    "PROGRESS_FRACTION_STEP", "PROGRESS_LIMIT_BYTES", "PROGRESS_PATH", "PROGRESS_STEPS",
    "PSEUDONYM_PATTERN", "SCRATCH_DIR", "ExitCode",
]


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
        if not PSEUDONYM_PATTERN.match(value):
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
        if not PSEUDONYM_PATTERN.match(value):
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
