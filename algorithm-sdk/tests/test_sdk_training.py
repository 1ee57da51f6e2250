"""The training SDK: fit/evaluate/init through the contract's files, answers checked, and
plain FedAvg in one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tributary_algorithm.tensors import read_tensors, write_tensors
from tributary_algorithm.training import (
    FitResult,
    RoundConfig,
    TrainingAlgorithm,
    TrainingCase,
    TrainingData,
    execute_training,
    federated_average,
    simulate,
)


class Mean(TrainingAlgorithm):
    """Learns the mean of its cases' label ``y`` by gradient steps on the squared error."""

    def init(self, config):
        return {"mu": np.zeros(1)}

    def fit(self, parameters, data, config):
        ys = np.array([c.labels["y"] for c in data.cases], dtype=float)
        mu = parameters["mu"].copy()
        for _ in range(config.local_epochs):
            mu -= (config.learning_rate or 0.5) * (mu - ys.mean()
                                                    + config.proximal_mu * (mu - parameters["mu"]))
        return {"mu": mu}, len(ys), {"loss": float(((ys - mu) ** 2).mean())}

    def evaluate(self, parameters, data, config):
        ys = np.array([c.labels["y"] for c in data.cases], dtype=float)
        return float(((ys - parameters["mu"]) ** 2).mean()), len(ys), {"n": len(ys)}


def _site(*ys: float) -> TrainingData:
    return TrainingData(tuple(TrainingCase(f"c-{i:016x}", (), {"y": y})
                              for i, y in enumerate(ys)))


def _layout(tmp_path: Path, task: str, model: dict | None) -> str:
    (tmp_path / "output").mkdir()
    (tmp_path / "round.json").write_text(json.dumps(
        RoundConfig(round=1, task=task, local_epochs=3).to_json()))
    cohort = {"contract_version": "1.1", "training_contract_version": "1.0",
              "experiment_id": "e", "cases": [
                  {"case_id": "c-0000000000000001", "series": [], "labels": {"y": 2.0}},
                  {"case_id": "c-0000000000000002", "series": [], "labels": {"y": 4.0}}]}
    (tmp_path / "cohort.json").write_text(json.dumps(cohort))
    if model is not None:
        write_tensors(tmp_path / "global.safetensors", model)
    return json.dumps({
        "contract_version": "1.1", "training_contract_version": "1.0", "arguments": {},
        "cohort": str(tmp_path / "cohort.json"), "round": str(tmp_path / "round.json"),
        "model": str(tmp_path / "global.safetensors") if model is not None else None,
        "output": str(tmp_path / "output" / "output.json"),
        "parameters": str(tmp_path / "output" / "parameters.safetensors")})


def test_fit_writes_parameters_and_output(tmp_path: Path) -> None:
    arg = _layout(tmp_path, "fit", {"mu": np.zeros(1)})
    assert execute_training(Mean(), arg) == 0
    output = json.loads((tmp_path / "output" / "output.json").read_text())
    assert output["task"] == "fit" and output["num_examples"] == 2
    assert output["training_contract_version"] == "1.0"
    mu = read_tensors(tmp_path / "output" / "parameters.safetensors")["mu"]
    assert 2.0 < mu[0] < 3.0  # three steps of 0.5 towards 3


def test_evaluate_writes_no_parameters(tmp_path: Path) -> None:
    arg = _layout(tmp_path, "evaluate", {"mu": np.array([3.0])})
    assert execute_training(Mean(), arg) == 0
    output = json.loads((tmp_path / "output" / "output.json").read_text())
    assert output == {"training_contract_version": "1.0", "task": "evaluate",
                      "num_examples": 2, "loss": 1.0, "metrics": {"n": 2}}
    assert not (tmp_path / "output" / "parameters.safetensors").exists()


def test_init_writes_initial_parameters(tmp_path: Path) -> None:
    arg = _layout(tmp_path, "init", None)
    assert execute_training(Mean(), arg) == 0
    assert read_tensors(tmp_path / "output" / "parameters.safetensors")["mu"].tolist() == [0.0]


class Reshaping(Mean):
    def fit(self, parameters, data, config):
        return {"mu": np.zeros(2)}, 1, {}


class Chatty(Mean):
    def fit(self, parameters, data, config):
        return parameters, 1, {"note": "patient 42 looked odd"}


class Negative(Mean):
    def fit(self, parameters, data, config):
        return parameters, -1, {}


@pytest.mark.parametrize("algorithm, needle", [
    (Reshaping(), "same tensors"), (Chatty(), "must be a number"),
    (Negative(), "non-negative integer")])
def test_answers_that_break_the_contract_fail_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], algorithm: TrainingAlgorithm,
        needle: str) -> None:
    arg = _layout(tmp_path, "fit", {"mu": np.zeros(1)})
    assert execute_training(algorithm, arg) == 1
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "output" / "output.json").exists()


def test_a_run_without_a_training_algo_arg_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert execute_training(Mean(), json.dumps({"contract_version": "1.1"})) == 1
    assert "does not describe a training run" in capsys.readouterr().err


def test_federated_average_weights_by_sample_count() -> None:
    averaged = federated_average([FitResult({"w": np.array([0.0], dtype=np.float32)}, 1),
                                  FitResult({"w": np.array([4.0], dtype=np.float32)}, 3)])
    assert averaged["w"].tolist() == [3.0] and averaged["w"].dtype == np.float32


def test_simulate_converges_to_the_pooled_mean() -> None:
    sites = [_site(1.0, 1.0), _site(5.0, 5.0, 5.0, 5.0, 5.0, 5.0)]  # pooled mean 4.0
    final, history = simulate(Mean(), sites, rounds=20,
                              base=RoundConfig(round=0, local_epochs=1, learning_rate=0.5))
    assert abs(final["mu"][0] - 4.0) < 1e-3
    assert [r.participants for r in history] == [2] * 20
    assert history[-1].eval_loss < history[0].eval_loss


def test_a_malformed_cohort_or_round_fails_with_a_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arg = _layout(tmp_path, "fit", {"mu": np.zeros(1)})
    (tmp_path / "cohort.json").write_text(json.dumps({"cases": [{"labels": {}}]}))
    assert execute_training(Mean(), arg) == 1
    assert "cohort.json is malformed" in capsys.readouterr().err
    (tmp_path / "round.json").write_text(json.dumps({"round": "1", "task": "fit"}))
    assert execute_training(Mean(), arg) == 1
    assert "round must be an integer" in capsys.readouterr().err


def test_cli_training_needs_sites(capsys: pytest.CaptureFixture[str]) -> None:
    from tributary_algorithm.cli import main

    assert main(["test", "--training", "some-image:tag"]) == 1
    assert "--site" in capsys.readouterr().err
