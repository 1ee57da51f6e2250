"""The algorithm contract v1.1: its paths, limits and exit codes, with the standard library
only, so that an algorithm image needs nothing else.

This module is the one definition: the platform (``tributary.protocol.contract``) imports
these values and adds the pydantic models it validates messages and files with.
"""

from __future__ import annotations

import re
from enum import IntEnum

CONTRACT_VERSION = "1.1"

#: Environment variable carrying the JSON-encoded ALGO_ARG object.
ALGO_ARG_ENV = "ALGO_ARG"
#: Fixed paths inside the container.
PARTICIPANT_PATH = "/tributary/participant.json"
INPUT_ROOT = "/tributary/input"
OUTPUT_DIR = "/tributary/output"
OUTPUT_PATH = f"{OUTPUT_DIR}/output.json"
#: Optional progress file (contract 1.1): {"fraction": 0..1, "message": one of
#: PROGRESS_STEPS or null}. Progress leaves the spoke unreviewed, so it is a rounded
#: fraction and a word of a fixed vocabulary, never free text.
PROGRESS_PATH = f"{OUTPUT_DIR}/progress.json"
PROGRESS_LIMIT_BYTES = 4096
PROGRESS_FRACTION_STEP = 0.05
MAX_PROGRESS_REPORTS_PER_CASE = 30
PROGRESS_STEPS = ("starting", "loading", "preprocessing", "segmenting", "detecting",
                  "measuring", "classifying", "postprocessing", "writing", "done")
SCRATCH_DIR = "/tmp"

#: The spoke refuses output.json files larger than this (unless its config raises it).
DEFAULT_OUTPUT_LIMIT_BYTES = 1024 * 1024

#: Pseudonymous identifiers look like ``c-0123456789abcdef`` (case) or ``s-…`` (series).
PSEUDONYM_PATTERN = re.compile(r"^[a-z]-[0-9a-f]{16,64}$")


class ExitCode(IntEnum):
    """What an algorithm's exit status means to the spoke."""

    SUCCESS = 0  # output.json written and complete
    ERROR = 1  # the algorithm failed (any other non-zero status is treated the same)
    INVALID_ARGUMENTS = 2  # the arguments in ALGO_ARG are not acceptable to this algorithm
    UNSUITABLE_INPUT = 3  # this case cannot be processed by this algorithm (e.g. no CT)


def exit_label(code: int) -> str:
    """Short label for an exit status, used to prefix messages on stderr."""
    return {
        ExitCode.SUCCESS: "success",
        ExitCode.ERROR: "error",
        ExitCode.INVALID_ARGUMENTS: "invalid arguments",
        ExitCode.UNSUITABLE_INPUT: "unsuitable input",
    }.get(code, f"error (exit {code})")


def describe_exit_code(code: int) -> str:
    """Say what a container exit status means, the way a spoke would interpret it."""
    if code in set(ExitCode):
        return exit_label(code)
    if code == 137:
        return "error (killed by SIGKILL: out of memory, or stopped after a timeout)"
    if code == 139:
        return "error (segmentation fault)"
    return "error (any other non-zero exit status counts as an error)"


# --- The training contract (an extension of the contract above; docs/training.md) ---------
#: A spoke runs a training algorithm once per round on all its selected cases: it mounts the
#: global model read-only and takes back updated parameters plus output.json.
TRAINING_CONTRACT_VERSION = "1.0"
#: Describes every case of the training run (each case's series under INPUT_ROOT/case-NNN/).
COHORT_PATH = "/tributary/cohort.json"
#: Read-only: the global model and what this round asks for.
MODEL_DIR = "/tributary/model"
GLOBAL_MODEL_PATH = f"{MODEL_DIR}/global.safetensors"
ROUND_PATH = f"{MODEL_DIR}/round.json"
#: Written by the algorithm (fit and init tasks), next to output.json.
PARAMETERS_PATH = f"{OUTPUT_DIR}/parameters.safetensors"
#: What a training run is asked to do: update the global model on the local data, measure
#: the global model on the local data without updating it, or write initial parameters.
TRAINING_TASKS = ("fit", "evaluate", "init")
#: Metrics leave the spoke: a few named numbers, never free text.
METRIC_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
MAX_METRICS = 32
