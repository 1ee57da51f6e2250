"""The algorithm contract has one definition: the SDK's standard-library module, which the
protocol imports rather than restates; the documented JSON Schemas must equal the models."""

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
def test_the_protocol_uses_the_sdks_constants(name: str) -> None:
    assert getattr(protocol, name) is getattr(sdk, name)


def test_sdk_progress_steps_match_the_protocol() -> None:
    assert tuple(step.value for step in protocol.ProgressStep) == sdk.PROGRESS_STEPS


def test_the_protocol_uses_the_sdks_exit_codes() -> None:
    assert protocol.ExitCode is sdk.ExitCode


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_documented_schemas_are_current(name: str) -> None:
    path = DOCS / name
    assert path.exists(), f"run `make schemas` to write {path.name}"
    assert path.read_text() == render(name), f"{name} is stale: run `make schemas`"
