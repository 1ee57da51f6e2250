"""A training algorithm whose cost is its model's size, for bench_training_rounds: every
fit reads the global model (whatever its tensors), takes one cheap step on each tensor and
writes the result, so a run costs the container, the model's file in and the update's file
out, and nothing else worth timing."""

import numpy as np

from tributary_algorithm.training import TrainingAlgorithm, run_training


class SizedModel(TrainingAlgorithm):
    def fit(self, parameters, data, config):
        rng = np.random.default_rng(config.seed)
        step = {name: (0.99 * value + 0.01 * rng.standard_normal(value.shape)).astype(
            value.dtype) for name, value in parameters.items()}
        return step, len(data.cases), {"loss": 1.0}

    def evaluate(self, parameters, data, config):
        return 1.0, len(data.cases), {}


if __name__ == "__main__":
    run_training(SizedModel())
