"""Running an existing Flower ``NumPyClient`` unchanged as a Tributary training algorithm.

A Flower client holds its own data and speaks in lists of arrays: ``get_parameters(config)``,
``fit(parameters, config) -> (parameters, num_examples, metrics)`` and
``evaluate(parameters, config) -> (loss, num_examples, metrics)``. The adapter builds the
client from the site's :class:`~tributary_algorithm.training.TrainingData` with a factory
you give it, names the arrays ``arr_000``, ``arr_001``, … in the client's order, and passes
the round's settings as Flower's config (``server_round``, ``local_epochs``,
``proximal_mu``, ``learning_rate``, … and the study's own ``config``)::

    from tributary_algorithm.flower import FlowerAdapter
    from tributary_algorithm.training import run_training

    run_training(FlowerAdapter(lambda data: FlowerClient(*load_partition(data))))

Duck-typed: any object with these three methods works, so the adapter itself does not
import ``flwr`` (install ``tributary-algorithm[flower]`` for the client's own base class).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from .errors import AlgorithmError
from .tensors import Tensors
from .training import (
    EvaluateResult,
    FitResult,
    RoundConfig,
    TrainingAlgorithm,
    TrainingData,
)

#: Flower's parameters are an ordered list; the contract's are named. ``arr_000`` … keeps
#: the order (the safetensors header is a JSON object, its key order is not relied upon).
NAME_FORMAT = "arr_{:03d}"


def to_named(arrays: Sequence[Any]) -> Tensors:
    """Flower's list of arrays as the contract's named tensors."""
    return {NAME_FORMAT.format(i): np.asarray(a) for i, a in enumerate(arrays)}


def to_list(tensors: Tensors) -> list[np.ndarray]:
    """The contract's named tensors as Flower's ordered list."""
    names = [NAME_FORMAT.format(i) for i in range(len(tensors))]
    if sorted(names) != sorted(tensors):
        raise AlgorithmError(f"a Flower model's tensors are named {NAME_FORMAT.format(0)}, "
                             f"{NAME_FORMAT.format(1)}, …; got {sorted(tensors)[:5]}")
    return [tensors[name] for name in names]


class FlowerAdapter(TrainingAlgorithm):
    """A training algorithm made of a Flower ``NumPyClient`` (built per run by
    ``client_fn(data)``; the initial model from ``get_parameters``)."""

    def __init__(self, client_fn: Callable[[TrainingData | None], Any]) -> None:
        self.client_fn = client_fn

    def init(self, config: RoundConfig) -> Tensors:
        client = self.client_fn(None)
        return to_named(client.get_parameters(config.flower_config()))

    def fit(self, parameters: Tensors, data: TrainingData, config: RoundConfig) -> FitResult:
        client = self.client_fn(data)
        arrays, num_examples, metrics = client.fit(to_list(parameters), config.flower_config())
        return FitResult(to_named(arrays), num_examples, dict(metrics or {}))

    def evaluate(self, parameters: Tensors, data: TrainingData,
                 config: RoundConfig) -> EvaluateResult:
        client = self.client_fn(data)
        loss, num_examples, metrics = client.evaluate(to_list(parameters),
                                                      config.flower_config())
        return EvaluateResult(float(loss), num_examples, dict(metrics or {}))
