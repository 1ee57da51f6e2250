"""The algorithm contract has one definition: the SDK's standard-library copy and the
documented JSON Schemas must equal what the protocol module says."""

from pathlib import Path

import pytest

import tributary.protocol.contract as protocol
import tributary_algorithm.contract as sdk
from tributary.protocol.schemas import SCHEMAS, render

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


@pytest.mark.parametrize("name", ["CONTRACT_VERSION", "ALGO_ARG_ENV", "PARTICIPANT_PATH",
                                  "INPUT_ROOT", "OUTPUT_DIR", "OUTPUT_PATH", "SCRATCH_DIR",
                                  "DEFAULT_OUTPUT_LIMIT_BYTES", "PROGRESS_PATH",
                                  "PROGRESS_LIMIT_BYTES", "PROGRESS_FRACTION_STEP",
                                  "MAX_PROGRESS_REPORTS_PER_CASE"])
def test_sdk_constants_match_the_protocol(name: str) -> None:
    assert getattr(sdk, name) == getattr(protocol, name)


def test_sdk_progress_steps_match_the_protocol() -> None:
    assert tuple(step.value for step in protocol.ProgressStep) == sdk.PROGRESS_STEPS


def test_sdk_exit_codes_match_the_protocol() -> None:
    assert {c.name: c.value for c in sdk.ExitCode} == {c.name: c.value for c in protocol.ExitCode}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_documented_schemas_are_current(name: str) -> None:
    path = DOCS / name
    assert path.exists(), f"run `make schemas` to write {path.name}"
    assert path.read_text() == render(name), f"{name} is stale: run `make schemas`"
