"""Server-side optimisers for federated training (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021): the hub treats each round's aggregated update (the mean of the
survivors' clipped, noised, SecAgg+-summed deltas) as a pseudo-gradient and applies Adam,
Yogi or Adagrad to the global model with it, instead of adding it as FedAvg does.

Why here and not in the algorithm: the hub only ever sees the sum, so a server optimiser
is the one place an adaptive step can happen without weakening secure aggregation; it
works on the aggregate alone and costs the spokes nothing. It is post-processing of a
differentially private release, so it spends no privacy budget.

The formulas follow Flower's ``FedAdam``/``FedYogi``/``FedAdagrad`` (including Flower's
bias-corrected step size for Adam), and the unit tests check the results against
Flower's own strategies round by round, so a study moved from Flower trains the same way.
The moments are the optimiser's whole state: a pair of float64 vectors the caller keeps
durably beside the global model (they are as large as the model), with the round count.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Strategies applied by the hub at each round's close (the spokes train as with FedAvg).
SERVER_STRATEGIES = ("fedadam", "fedyogi", "fedadagrad")
HYPER_PARAMETERS = ("server_lr", "beta_1", "beta_2", "tau")


class ServerOptimiserError(ValueError):
    """An optimiser's settings or state do not fit the model or each other."""


class ServerOptimiser(BaseModel):
    """Which server optimiser a training study uses, and its hyper-parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fedavg", "fedadam", "fedyogi", "fedadagrad"] = "fedavg"
    #: Server learning rate (eta); FedAvg ignores it and adds the aggregate as it is.
    server_lr: float = Field(0.1, gt=0, le=100)
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    #: Adaptivity (tau): bounds the step where the second moment is tiny.
    tau: float = Field(1e-9, gt=0, le=10)

    @model_validator(mode="after")
    def _finite(self) -> ServerOptimiser:
        if not all(math.isfinite(v) for v in (self.server_lr, self.beta_1, self.beta_2,
                                              self.tau)):
            raise ValueError("server optimiser settings must be finite")
        return self


class OptimiserState(BaseModel):
    """The moments after ``steps`` updates (None before the first)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    steps: int = Field(0, ge=0)
    m: np.ndarray | None = None
    v: np.ndarray | None = None


def step(optimiser: ServerOptimiser, weights: np.ndarray, delta: np.ndarray,
         state: OptimiserState) -> tuple[np.ndarray, OptimiserState]:
    """The next global model (flat float64 vector) from the current one and the round's
    aggregated update ``delta`` (the survivors' weighted mean delta), and the new state.
    ``state`` is not changed (the caller persists the new one with the new model)."""
    weights = np.asarray(weights, dtype=np.float64)
    delta = np.asarray(delta, dtype=np.float64)
    if weights.ndim != 1 or delta.shape != weights.shape:
        raise ServerOptimiserError(f"update of shape {delta.shape} does not fit a model of "
                                   f"shape {weights.shape}")
    if not np.all(np.isfinite(delta)):
        raise ServerOptimiserError("the aggregated update has NaN or infinite values")
    if optimiser.kind == "fedavg":
        return weights + delta, OptimiserState(steps=state.steps + 1)
    for name, moment in (("m", state.m), ("v", state.v)):
        if moment is not None and moment.shape != weights.shape:
            raise ServerOptimiserError(f"optimiser state {name} of shape {moment.shape} "
                                       f"does not fit a model of shape {weights.shape}")
    b1, b2 = optimiser.beta_1, optimiser.beta_2
    m_prev = state.m if state.m is not None else np.zeros_like(delta)
    v_prev = state.v if state.v is not None else np.zeros_like(delta)  # as Flower starts
    m = b1 * m_prev + (1 - b1) * delta
    square = delta * delta
    if optimiser.kind == "fedadam":
        v = b2 * v_prev + (1 - b2) * square
    elif optimiser.kind == "fedyogi":
        v = v_prev - (1 - b2) * square * np.sign(v_prev - square)
    else:  # fedadagrad
        v = v_prev + square
    eta = optimiser.server_lr
    if optimiser.kind == "fedadam":
        # Flower's bias correction for Adam (Kingma & Ba's alpha_t); its round numbers start
        # at 1 and it uses round + 1, hence steps + 2.
        t = state.steps + 2.0
        eta = optimiser.server_lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    new = weights + eta * m / (np.sqrt(v) + optimiser.tau)
    return new, OptimiserState(steps=state.steps + 1, m=m, v=v)


def settings_for(strategy: str, given: dict[str, float | None]) -> ServerOptimiser | None:
    """The server optimiser of a study launched with ``strategy`` and the hyper-parameters
    ``given`` (None: the default), or None for FedAvg and FedProx, which refuse them: a
    setting that would silently do nothing is a mistake the coordinator should hear of."""
    chosen = {k: v for k, v in given.items() if v is not None}
    if strategy not in SERVER_STRATEGIES:
        if chosen:
            raise ValueError(f"{', '.join(sorted(chosen))}: for "
                             f"{', '.join(SERVER_STRATEGIES)} only, not {strategy}")
        return None
    return ServerOptimiser(kind=strategy, **chosen)  # type: ignore[arg-type]
