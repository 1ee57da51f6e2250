"""Writing a training algorithm: ``fit``, ``evaluate`` and (optionally) ``init`` over
named numpy arrays, and the runtime that turns them into the training contract's files.

Inside an algorithm image (``pip install 'tributary-algorithm[training]'``)::

    from tributary_algorithm.training import TrainingAlgorithm, run_training

    class MyModel(TrainingAlgorithm):
        def init(self, config):
            return {"w": np.zeros(3)}
        def fit(self, params, data, config):
            ...
            return new_params, n_samples, {"loss": 0.4}
        def evaluate(self, params, data, config):
            ...
            return loss, n_samples, {"accuracy": 0.9}

    if __name__ == "__main__":
        run_training(MyModel())

:func:`federated_average` and :func:`simulate` run plain FedAvg in one process over several
sites' data, so the contract can be tried before any hub exists.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Union

import numpy as np

from .context import Series, atomic_write, encode_output
from .contract import (
    ALGO_ARG_ENV,
    COHORT_PATH,
    GLOBAL_MODEL_PATH,
    MAX_METRICS,
    METRIC_NAME_PATTERN,
    OUTPUT_PATH,
    PARAMETERS_PATH,
    ROUND_PATH,
    TRAINING_CONTRACT_VERSION,
    TRAINING_TASKS,
)
from .errors import AlgorithmError, ContextError
from .runner import execute
from .tensors import Tensors, read_tensors, spec_of, write_tensors

Scalar = Union[bool, int, float, str]
Metrics = dict[str, Union[int, float]]


@dataclass(frozen=True)
class RoundConfig:
    """``round.json``: which round, which task, and the study's settings for it."""

    round: int
    task: str = "fit"
    study_id: str = "local"
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    local_epochs: int = 1
    learning_rate: float | None = None
    batch_size: int | None = None
    seed: int = 0
    config: dict[str, Scalar] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> RoundConfig:
        known = {k: value[k] for k in cls.__dataclass_fields__ if k in value}
        spec = cls(**known)
        if spec.task not in TRAINING_TASKS:
            raise ContextError(f"round.json: task must be one of {TRAINING_TASKS}")
        for name in ("round", "local_epochs", "seed"):
            if isinstance(getattr(spec, name), bool) or not isinstance(getattr(spec, name), int):
                raise ContextError(f"round.json: {name} must be an integer")
        if not isinstance(spec.config, dict):
            raise ContextError("round.json: config must be an object")
        return spec

    def to_json(self) -> dict[str, Any]:
        return {"training_contract_version": TRAINING_CONTRACT_VERSION,
                **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    def flower_config(self) -> dict[str, Scalar]:
        """The settings as a Flower config dict (``server_round``, ``local_epochs``, …)."""
        out: dict[str, Scalar] = {"server_round": self.round, "local_epochs": self.local_epochs,
                                  "proximal_mu": self.proximal_mu, "seed": self.seed}
        if self.learning_rate is not None:
            out["learning_rate"] = self.learning_rate
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        return {**out, **self.config}


@dataclass(frozen=True)
class TrainingCase:
    """One case: its de-identified series and the labels released for training."""

    case_id: str
    series: tuple[Series, ...]
    labels: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingData:
    """A site's data for one run: its cases and the algorithm's arguments."""

    cases: tuple[TrainingCase, ...]
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FitResult:
    parameters: Tensors
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateResult:
    loss: float
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


class TrainingAlgorithm:
    """Subclass and implement :meth:`fit` and :meth:`evaluate` (and :meth:`init` when the
    study starts from the algorithm's own initial model). Parameters are a dict of name to
    numpy array (float32/float64/integer); keep the names and shapes from round to round."""

    def init(self, config: RoundConfig) -> Tensors:
        raise AlgorithmError("this algorithm has no initial parameters; the study must "
                             "provide an initial model")

    def fit(self, parameters: Tensors, data: TrainingData,
            config: RoundConfig) -> FitResult | tuple[Tensors, int, Metrics]:
        raise NotImplementedError

    def evaluate(self, parameters: Tensors, data: TrainingData,
                 config: RoundConfig) -> EvaluateResult | tuple[float, int, Metrics]:
        raise NotImplementedError


def check_metrics(metrics: Mapping[str, Any] | None) -> Metrics:
    """Metrics leave the spoke: named finite numbers only, at most :data:`MAX_METRICS`."""
    out: Metrics = {}
    for name, value in (metrics or {}).items():
        if not isinstance(name, str) or not METRIC_NAME_PATTERN.match(name):
            raise AlgorithmError(f"metric name {name!r} must match {METRIC_NAME_PATTERN.pattern}")
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
            raise AlgorithmError(f"metric {name!r} must be a number, not {type(value).__name__}")
        number = value.item() if isinstance(value, np.generic) else value
        if isinstance(number, float) and not math.isfinite(number):
            raise AlgorithmError(f"metric {name!r} is not finite")
        out[name] = number
    if len(out) > MAX_METRICS:
        raise AlgorithmError(f"{len(out)} metrics, at most {MAX_METRICS}")
    return out


def call_fit(algorithm: TrainingAlgorithm, parameters: Tensors, data: TrainingData,
             config: RoundConfig) -> FitResult:
    """``algorithm.fit`` with its answer checked: same tensor names, shapes and dtypes."""
    answer = algorithm.fit({k: v.copy() for k, v in parameters.items()}, data, config)
    result = answer if isinstance(answer, FitResult) else FitResult(*answer)
    new = {k: np.asarray(v) for k, v in result.parameters.items()}
    if spec_of(new) != spec_of(parameters):
        raise AlgorithmError("fit must return the same tensors (names, shapes, dtypes) "
                             "it was given")
    return FitResult(new, _count(result.num_examples), check_metrics(result.metrics))


def call_evaluate(algorithm: TrainingAlgorithm, parameters: Tensors, data: TrainingData,
                  config: RoundConfig) -> EvaluateResult:
    answer = algorithm.evaluate({k: v.copy() for k, v in parameters.items()}, data, config)
    result = answer if isinstance(answer, EvaluateResult) else EvaluateResult(*answer)
    loss = float(result.loss)
    if not math.isfinite(loss):
        raise AlgorithmError("evaluate returned a loss that is not finite")
    return EvaluateResult(loss, _count(result.num_examples), check_metrics(result.metrics))


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise AlgorithmError(f"the sample count must be a non-negative integer, not {value!r}")
    return int(value)


# --- The container side: reading the contract's files, writing the answer ------------------

@dataclass(frozen=True)
class TrainingContext:
    """Where a training run's files are (from ``ALGO_ARG``) and what they say."""

    config: RoundConfig
    data: TrainingData
    model_path: str | None
    output_path: str = OUTPUT_PATH
    parameters_path: str = PARAMETERS_PATH


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ContextError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ContextError(f"{what} {path} must hold a JSON object")
    return value


def load_training_context(algo_arg: str | None = None) -> TrainingContext:
    """Read ``ALGO_ARG`` (or the given JSON), ``round.json`` and ``cohort.json``."""
    raw = algo_arg if algo_arg is not None else os.environ.get(ALGO_ARG_ENV)
    if raw is None:
        raise ContextError(f"{ALGO_ARG_ENV} is not set: not running under a spoke")
    try:
        arg = json.loads(raw)
    except ValueError as exc:
        raise ContextError(f"{ALGO_ARG_ENV} is not valid JSON: {exc}") from exc
    if not isinstance(arg, dict) or "training_contract_version" not in arg:
        raise ContextError(f"{ALGO_ARG_ENV} does not describe a training run")
    major = str(arg["training_contract_version"]).split(".")[0]
    if major != TRAINING_CONTRACT_VERSION.split(".")[0]:
        raise ContextError(f"training contract {arg['training_contract_version']} is not "
                           f"supported (this SDK: {TRAINING_CONTRACT_VERSION})")
    config = RoundConfig.from_json(_read_json(arg.get("round", ROUND_PATH), "round.json"))
    cohort = _read_json(arg.get("cohort", COHORT_PATH), "cohort.json")
    try:
        cases = [TrainingCase(str(case["case_id"]),
                              tuple(Series(**{k: s.get(k) for k in Series.__dataclass_fields__})
                                    for s in case.get("series", [])),
                              dict(case.get("labels") or {}))
                 for case in cohort.get("cases", [])]
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ContextError(f"cohort.json is malformed: {type(exc).__name__}: {exc}") from exc
    arguments = arg.get("arguments") or {}
    return TrainingContext(
        config=config, data=TrainingData(tuple(cases), dict(arguments)),
        model_path=arg.get("model", GLOBAL_MODEL_PATH),
        output_path=arg.get("output", OUTPUT_PATH),
        parameters_path=arg.get("parameters", PARAMETERS_PATH))


def training_output(task: str, num_examples: int, loss: float | None,
                    metrics: Metrics) -> dict[str, Any]:
    """The ``output.json`` of a training run."""
    return {"training_contract_version": TRAINING_CONTRACT_VERSION, "task": task,
            "num_examples": num_examples, "loss": loss, "metrics": metrics}


def perform(algorithm: TrainingAlgorithm, ctx: TrainingContext) -> dict[str, Any]:
    """Do the task ``round.json`` asks for: write the parameters file (fit, init) and
    return ``output.json``'s content."""
    task = ctx.config.task
    if task == "init":
        params = {k: np.asarray(v) for k, v in algorithm.init(ctx.config).items()}
        write_tensors(ctx.parameters_path, params)
        return training_output(task, 0, None, {})
    if not ctx.model_path:
        raise ContextError("no global model was given for a fit or evaluate run")
    global_params = read_tensors(ctx.model_path)
    if task == "fit":
        fitted = call_fit(algorithm, global_params, ctx.data, ctx.config)
        write_tensors(ctx.parameters_path, fitted.parameters)
        loss = fitted.metrics.get("loss")
        return training_output(task, fitted.num_examples,
                               float(loss) if loss is not None else None, fitted.metrics)
    evaluated = call_evaluate(algorithm, global_params, ctx.data, ctx.config)
    return training_output(task, evaluated.num_examples, evaluated.loss, evaluated.metrics)


def execute_training(algorithm: TrainingAlgorithm, algo_arg: str | None = None) -> int:
    """Run one training task with the contract's exit-code discipline; the exit status."""

    def main(_ctx: Any) -> None:
        ctx = load_training_context(algo_arg)
        output = perform(algorithm, ctx)
        atomic_write(ctx.output_path, encode_output(output))
        return None

    return execute(main, _TrainingShim())


class _TrainingShim:
    """Stands in for the case Context that :func:`execute` expects; the training run
    writes its own output.json."""

    output_written = True


def run_training(algorithm: TrainingAlgorithm) -> NoReturn:
    """The container's entry point: do the task and exit with the contract's code."""
    sys.exit(execute_training(algorithm))


# --- In one process: plain FedAvg over several sites ---------------------------------------

def round_seed(study_seed: int, round_number: int, site_index: int) -> int:
    """The ``seed`` of one site's run in one round: different per site and round,
    reproducible from the study's seed."""
    return (study_seed + 7919 * round_number + site_index) % 2**32


def federated_average(results: Sequence[FitResult]) -> Tensors:
    """FedAvg: the sample-weighted mean of the sites' parameters (float64 sums, cast back
    to each tensor's dtype)."""
    total = sum(r.num_examples for r in results)
    if total <= 0:
        raise ValueError("no site reported any samples")
    names = results[0].parameters
    return {name: (sum(r.parameters[name].astype(np.float64) * r.num_examples
                       for r in results) / total).astype(names[name].dtype)
            for name in names}


@dataclass(frozen=True)
class RoundRecord:
    round: int
    participants: int
    train_loss: float | None
    eval_loss: float
    metrics: Metrics


def simulate(algorithm: TrainingAlgorithm, sites: Sequence[TrainingData], rounds: int,
             initial: Tensors | None = None, base: RoundConfig | None = None,
             ) -> tuple[Tensors, list[RoundRecord]]:
    """Plain FedAvg in one process: each round every site fits the global model, the
    updates are averaged by sample count, and the new model is evaluated on every site
    (metrics sample-weighted). Returns the final model and one record per round."""
    base = base or RoundConfig(round=0)

    def spec(number: int, task: str, site: int) -> RoundConfig:
        fields = {k: getattr(base, k) for k in base.__dataclass_fields__}
        return RoundConfig(**{**fields, "round": number, "task": task,
                              "seed": round_seed(base.seed, number, site)})

    params = initial if initial is not None else algorithm.init(spec(0, "init", 0))
    params = {k: np.asarray(v) for k, v in params.items()}
    history = []
    for number in range(1, rounds + 1):
        fits = [call_fit(algorithm, params, data, spec(number, "fit", i))
                for i, data in enumerate(sites)]
        params = federated_average(fits)
        evals = [call_evaluate(algorithm, params, data, spec(number, "evaluate", i))
                 for i, data in enumerate(sites)]
        history.append(RoundRecord(number, len(fits), _weighted_loss(fits),
                                   *_weighted(evals)))
    return params, history


def _weighted_loss(fits: Sequence[FitResult]) -> float | None:
    losses = [(f.metrics["loss"], f.num_examples) for f in fits if "loss" in f.metrics]
    total = sum(n for _, n in losses)
    return float(sum(v * n for v, n in losses) / total) if total else None


def _weighted(evals: Sequence[EvaluateResult]) -> tuple[float, Metrics]:
    total = sum(e.num_examples for e in evals) or 1
    loss = sum(e.loss * e.num_examples for e in evals) / total
    names = set.intersection(*(set(e.metrics) for e in evals)) if evals else set()
    return float(loss), {n: float(sum(e.metrics[n] * e.num_examples for e in evals) / total)
                         for n in sorted(names)}
