"""The training contract's files: the platform's models accept what the SDK writes and
refuse what could carry data or break the spoke."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import tributary.protocol.training.contract as protocol
import tributary_algorithm.contract as sdk
from tributary.protocol.training.contract import (
    RoundSpec,
    TrainingAlgoArg,
    TrainingCohort,
    TrainingOutput,
)
from tributary_algorithm.training import RoundConfig, TrainingAlgorithm, execute_training


@pytest.mark.parametrize("name", ["COHORT_PATH", "GLOBAL_MODEL_PATH", "PARAMETERS_PATH",
                                  "ROUND_PATH", "TRAINING_CONTRACT_VERSION"])
def test_the_protocol_uses_the_sdks_constants(name: str) -> None:
    assert getattr(protocol, name) is getattr(sdk, name)


def test_tasks_match_the_sdk() -> None:
    assert tuple(t.value for t in protocol.TrainingTask) == sdk.TRAINING_TASKS


def test_the_sdks_round_config_is_a_valid_round_json() -> None:
    config = RoundConfig(round=3, task="fit", strategy="fedprox", proximal_mu=0.01,
                         local_epochs=2, learning_rate=0.1, seed=7, config={"l2": 0.001})
    spec = RoundSpec.model_validate(config.to_json())
    assert spec.proximal_mu == 0.01 and spec.config == {"l2": 0.001}


@pytest.mark.parametrize("change", [
    {"task": "train"}, {"round": -1}, {"proximal_mu": -0.1}, {"learning_rate": 0.0},
    {"seed": 2**32}, {"config": {"x": [1, 2]}}, {"config": {"bad key": 1}},
    {"config": {"x": "y" * 300}}, {"config": {f"k{i}": i for i in range(65)}},
    {"unknown": 1}])
def test_round_json_refuses(change: dict) -> None:
    base = {"study_id": "s", "round": 1, "task": "fit"}
    with pytest.raises(ValidationError):
        RoundSpec.model_validate({**base, **change})


def test_round_json_refuses_non_finite_numbers() -> None:
    with pytest.raises(ValidationError):
        RoundSpec.model_validate_json(
            '{"study_id": "s", "round": 1, "task": "fit", "config": {"x": Infinity}}')


def test_cohort_json_needs_pseudonyms_and_paths_under_the_input_root() -> None:
    case = {"case_id": "c-0123456789abcdef", "labels": {"nodule_count": 2},
            "series": [{"series_id": "s-0123456789abcdef", "modality": "CT",
                        "path": "/tributary/input/case-001/series-001",
                        "instance_count": 16}]}
    TrainingCohort.model_validate({"experiment_id": "e", "cases": [case]})
    for bad in ({**case, "case_id": "MRN12345"},
                {**case, "series": [{**case["series"][0], "path": "/etc"}]},
                {**case, "labels": {"name": {"nested": 1}}}):
        with pytest.raises(ValidationError):
            TrainingCohort.model_validate({"experiment_id": "e", "cases": [bad]})


def test_output_json_holds_named_numbers_only() -> None:
    TrainingOutput.model_validate({"task": "fit", "num_examples": 3, "loss": 0.5,
                                   "metrics": {"accuracy": 0.9}})
    for bad in ({"metrics": {"note": "text"}}, {"metrics": {"Bad Name": 1.0}},
                {"num_examples": -1}, {"metrics": {f"m{i}": 1 for i in range(33)}},
                {"extra": 1}):
        with pytest.raises(ValidationError):
            TrainingOutput.model_validate({"task": "fit", "num_examples": 3, **bad})


def test_algo_arg_defaults_are_the_fixed_paths() -> None:
    arg = TrainingAlgoArg()
    assert (arg.cohort, arg.round, arg.model, arg.parameters) == (
        "/tributary/cohort.json", "/tributary/model/round.json",
        "/tributary/model/global.safetensors", "/tributary/output/parameters.safetensors")


class _Constant(TrainingAlgorithm):
    def fit(self, parameters, data, config):
        return parameters, len(data.cases), {"loss": 0.25, "accuracy": 1}

    def evaluate(self, parameters, data, config):
        return 0.5, len(data.cases), {}


@pytest.mark.parametrize("task", ["fit", "evaluate"])
def test_what_the_sdk_writes_validates(tmp_path: Path, task: str) -> None:
    from tributary_algorithm.tensors import write_tensors

    write_tensors(tmp_path / "global.safetensors", {"w": np.zeros(2)})
    spec = RoundSpec(study_id="s", round=1, task=task)
    (tmp_path / "round.json").write_text(spec.model_dump_json())
    (tmp_path / "cohort.json").write_text(TrainingCohort(experiment_id="e",
                                                         cases=[]).model_dump_json())
    arg = TrainingAlgoArg(cohort=str(tmp_path / "cohort.json"),
                          round=str(tmp_path / "round.json"),
                          model=str(tmp_path / "global.safetensors"),
                          output=str(tmp_path / "output.json"),
                          parameters=str(tmp_path / "parameters.safetensors"))
    assert execute_training(_Constant(), arg.model_dump_json()) == 0
    output = TrainingOutput.model_validate(json.loads((tmp_path / "output.json").read_text()))
    assert output.task == task and output.num_examples == 0
