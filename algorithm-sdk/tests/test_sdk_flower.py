"""A Flower ``NumPyClient``, written as Flower's own examples write it, runs unchanged as a
Tributary training algorithm: through the contract's files and through plain FedAvg."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

flwr_client = pytest.importorskip("flwr.client")
NumPyClient = flwr_client.NumPyClient

from tributary_algorithm.flower import FlowerAdapter, to_list, to_named  # noqa: E402
from tributary_algorithm.tensors import read_tensors, write_tensors  # noqa: E402
from tributary_algorithm.training import (  # noqa: E402
    RoundConfig,
    TrainingCase,
    TrainingData,
    execute_training,
    simulate,
)

# --- Flower code, unmodified: nothing below knows about Tributary ---------------------------

class QuickstartClient(NumPyClient):
    """Flower's quickstart-numpy client."""

    def get_parameters(self, config):
        return [np.ones((1, 1))]

    def fit(self, parameters, config):
        return ([parameters[0] + 1], 1, {})

    def evaluate(self, parameters, config):
        return float(0.0), 1, {"accuracy": float(1.0)}  # noqa: UP018 (as Flower writes it)


class LinearRegressionClient(NumPyClient):
    """A typical NumPyClient holding its partition: y = X w + b by gradient descent."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def get_parameters(self, config):
        return [np.zeros(2), np.zeros(1)]

    def fit(self, parameters, config):
        w, b = parameters
        lr = float(config.get("learning_rate", 0.1))
        for _ in range(int(config["local_epochs"])):
            error = self.x @ w + b - self.y
            w = w - lr * self.x.T @ error / len(self.y)
            b = b - lr * error.mean(keepdims=True)
        return [w, b], len(self.y), {"loss": float(np.mean((self.x @ w + b - self.y) ** 2))}

    def evaluate(self, parameters, config):
        w, b = parameters
        mse = float(np.mean((self.x @ w + b - self.y) ** 2))
        return mse, len(self.y), {"mse": mse}


# --- The Tributary side: a factory from the site's data to the client -----------------------

def linear_client(data: TrainingData | None) -> LinearRegressionClient:
    if data is None:  # init: the client's own initial parameters
        return LinearRegressionClient(np.zeros((0, 2)), np.zeros(0))
    x = np.array([[c.labels["x1"], c.labels["x2"]] for c in data.cases], dtype=float)
    y = np.array([c.labels["y"] for c in data.cases], dtype=float)
    return LinearRegressionClient(x, y)


def _site(rng: np.random.Generator, n: int, shift: float) -> TrainingData:
    x = rng.normal(shift, 1.0, (n, 2))
    y = x @ np.array([2.0, -1.0]) + 0.5
    return TrainingData(tuple(
        TrainingCase(f"c-{i:016x}", (), {"x1": float(a), "x2": float(b), "y": float(t)})
        for i, ((a, b), t) in enumerate(zip(x, y))))


def test_names_keep_flowers_order() -> None:
    arrays = [np.zeros(3), np.ones((2, 2)), np.arange(4)]
    named = to_named(arrays)
    assert list(named) == ["arr_000", "arr_001", "arr_002"]
    assert all(np.array_equal(a, b) for a, b in zip(to_list(named), arrays))


def test_quickstart_client_through_the_contract_files(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    write_tensors(tmp_path / "global.safetensors", {"arr_000": np.full((1, 1), 5.0)})
    (tmp_path / "round.json").write_text(json.dumps(RoundConfig(round=2, task="fit").to_json()))
    (tmp_path / "cohort.json").write_text(json.dumps(
        {"experiment_id": "e", "cases": [{"case_id": "c-0000000000000001", "series": []}]}))
    arg = {"contract_version": "1.1", "training_contract_version": "1.0",
           "cohort": str(tmp_path / "cohort.json"), "round": str(tmp_path / "round.json"),
           "model": str(tmp_path / "global.safetensors"),
           "output": str(tmp_path / "out" / "output.json"),
           "parameters": str(tmp_path / "out" / "parameters.safetensors")}
    assert execute_training(FlowerAdapter(lambda data: QuickstartClient()), json.dumps(arg)) == 0
    params = read_tensors(tmp_path / "out" / "parameters.safetensors")
    assert params["arr_000"].tolist() == [[6.0]]
    output = json.loads((tmp_path / "out" / "output.json").read_text())
    assert output["num_examples"] == 1 and output["task"] == "fit"
    (tmp_path / "round.json").write_text(json.dumps(RoundConfig(round=2,
                                                                task="evaluate").to_json()))
    assert execute_training(FlowerAdapter(lambda data: QuickstartClient()), json.dumps(arg)) == 0
    output = json.loads((tmp_path / "out" / "output.json").read_text())
    assert output["loss"] == 0.0 and output["metrics"] == {"accuracy": 1.0}


def test_flower_client_learns_under_fedavg_across_non_iid_sites() -> None:
    rng = np.random.default_rng(3)
    sites = [_site(rng, 20, -2.0), _site(rng, 40, 0.0), _site(rng, 30, 3.0)]
    base = RoundConfig(round=0, local_epochs=5, learning_rate=0.05)
    final, history = simulate(FlowerAdapter(linear_client), sites, rounds=40, base=base)
    assert history[-1].eval_loss < 0.01 < history[0].eval_loss
    np.testing.assert_allclose(final["arr_000"], [2.0, -1.0], atol=0.1)
    np.testing.assert_allclose(final["arr_001"], [0.5], atol=0.15)


def test_a_client_changing_its_arrays_is_refused() -> None:
    class Growing(QuickstartClient):
        def fit(self, parameters, config):
            return [*parameters, np.zeros(1)], 1, {}

    from tributary_algorithm.errors import AlgorithmError
    from tributary_algorithm.training import call_fit

    with pytest.raises(AlgorithmError, match="same tensors"):
        call_fit(FlowerAdapter(lambda d: Growing()), {"arr_000": np.ones((1, 1))},
                 TrainingData(()), RoundConfig(round=1))
