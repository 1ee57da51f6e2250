"""The training contract, version 1.0: the files a spoke gives a training algorithm and the
ones it takes back (docs/training.md). An extension of the algorithm contract
(:mod:`tributary.protocol.contract`): same sandbox, same exit codes, same ``output.json``
path, plus a read-only model folder and a parameters file.

Paths and limits come from the SDK (``tributary_algorithm.contract``), their one definition.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from tributary.protocol.contract import ParticipantSeries
from tributary_algorithm.contract import (
    COHORT_PATH,
    CONTRACT_VERSION,
    GLOBAL_MODEL_PATH,
    MAX_METRICS,
    METRIC_NAME_PATTERN,
    OUTPUT_PATH,
    PARAMETERS_PATH,
    PSEUDONYM_PATTERN,
    ROUND_PATH,
    TRAINING_CONTRACT_VERSION,
)

__all__ = [
    "COHORT_PATH", "GLOBAL_MODEL_PATH", "PARAMETERS_PATH", "ROUND_PATH",
    "TRAINING_CONTRACT_VERSION", "RoundSpec", "Strategy", "TrainingAlgoArg", "TrainingCase",
    "TrainingCohort", "TrainingOutput", "TrainingTask",
]

#: At most this many entries in a round's free ``config`` and in a case's ``labels``.
MAX_CONFIG_ENTRIES = 64
MAX_CASES = 100_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _finite(value: float) -> float:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


#: A value Flower calls a Scalar: what a round may pass to the algorithm besides the fixed
#: fields. bool before int so JSON true stays a bool.
Scalar = (bool | int | Annotated[float, AfterValidator(_finite)]
          | Annotated[str, Field(max_length=256)])
ScalarMap = Annotated[dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")],
                           Scalar], Field(max_length=MAX_CONFIG_ENTRIES)]


class TrainingTask(StrEnum):
    """What one training run is asked to do."""

    FIT = "fit"  # update the global model on the local data
    EVALUATE = "evaluate"  # measure the global model on the local data, no update
    INIT = "init"  # write the algorithm's own initial parameters (no global model yet)


class Strategy(StrEnum):
    """How the hub combines updates. Only FedProx changes what the algorithm does (its
    proximal term ``proximal_mu``); the others are for the algorithm's information."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"


class RoundSpec(_Strict):
    """``round.json``, next to the global model (read-only): the round and its settings."""

    training_contract_version: str = TRAINING_CONTRACT_VERSION
    study_id: str = Field(max_length=128, description="The training study.")
    round: int = Field(ge=0, description="Round number, 1 for the first (0 for init).")
    task: TrainingTask
    strategy: Strategy = Strategy.FEDAVG
    proximal_mu: Annotated[float, AfterValidator(_finite)] = Field(
        0.0, ge=0.0, description="FedProx: add mu/2 * ||w - w_global||^2 to the local loss.")
    local_epochs: int = Field(1, ge=1, le=10_000)
    learning_rate: Annotated[float, AfterValidator(_finite)] | None = Field(
        None, gt=0.0, description="None: the algorithm's own default.")
    batch_size: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0, lt=2**32, description="Seed for this site and round.")
    config: ScalarMap = Field(default_factory=dict,
                              description="Further study settings (Flower's config).")


class TrainingCase(_Strict):
    """One case of the training run: its series (mounted read-only) and the labels the study
    asked for and the site's policy releases to the algorithm."""

    case_id: str
    series: list[ParticipantSeries]
    labels: ScalarMap = Field(default_factory=dict)

    @field_validator("case_id")
    @classmethod
    def _pseudonymous(cls, value: str) -> str:
        if not PSEUDONYM_PATTERN.match(value):
            raise ValueError("case_id must be a pseudonym like 'c-0123456789abcdef'")
        return value


class TrainingCohort(_Strict):
    """``cohort.json``: every case this site trains on in this round."""

    contract_version: str = CONTRACT_VERSION
    training_contract_version: str = TRAINING_CONTRACT_VERSION
    experiment_id: str = Field(max_length=128)
    cases: list[TrainingCase] = Field(max_length=MAX_CASES)


class TrainingAlgoArg(_Strict):
    """``ALGO_ARG`` of a training run: where everything is."""

    contract_version: str = CONTRACT_VERSION
    training_contract_version: str = TRAINING_CONTRACT_VERSION
    arguments: dict = Field(default_factory=dict, description="Algorithm-specific arguments.")
    cohort: str = COHORT_PATH
    round: str = ROUND_PATH
    model: str | None = Field(GLOBAL_MODEL_PATH, description="None for the init task.")
    output: str = OUTPUT_PATH
    parameters: str = PARAMETERS_PATH


MetricName = Annotated[str, Field(pattern=METRIC_NAME_PATTERN.pattern)]
Number = int | Annotated[float, AfterValidator(_finite)]


class TrainingOutput(_Strict):
    """``output.json`` of a training run: how many samples it used, its loss and a few named
    metrics (numbers only: they leave the spoke). The parameters are in the tensor file."""

    training_contract_version: str = TRAINING_CONTRACT_VERSION
    task: TrainingTask
    num_examples: int = Field(ge=0, description="Samples used: FedAvg's weight.")
    loss: Annotated[float, AfterValidator(_finite)] | None = None
    metrics: Annotated[dict[MetricName, Number], Field(max_length=MAX_METRICS)] = Field(
        default_factory=dict)
