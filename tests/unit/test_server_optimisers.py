"""The hub's server optimisers train as Flower's FedAdam, FedYogi and FedAdagrad do: the
same global model round after round, from the same aggregated updates (Flower's own
strategies run beside ours in the test), and FedAvg is the plain sum."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad, FedAdam, FedYogi
from pydantic import ValidationError

from tributary.hub.services.server_optimisers import (
    OptimiserState,
    ServerOptimiser,
    ServerOptimiserError,
    step,
)

FLOWER = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}


@pytest.mark.parametrize("kind", sorted(FLOWER))
def test_each_round_matches_flowers_strategy(kind: str) -> None:
    rng = np.random.default_rng(11)
    weights = rng.normal(size=257)
    # Flower's FedAdagrad has no momentum (beta_1 = 0); Reddi et al.'s allows it.
    betas = {"beta_1": 0.0} if kind == "fedadagrad" else {"beta_1": 0.8, "beta_2": 0.95}
    settings = ServerOptimiser(kind=kind, server_lr=0.05, tau=1e-3, **betas)
    flower = FLOWER[kind](initial_parameters=ndarrays_to_parameters([weights.copy()]),
                          eta=settings.server_lr, tau=settings.tau, accept_failures=False,
                          **({} if kind == "fedadagrad" else betas))
    state = OptimiserState()
    ours = weights.copy()
    for server_round in range(1, 7):
        delta = rng.normal(scale=0.3, size=weights.shape)
        # Flower takes the clients' new weights and averages them; one client with the
        # current weights plus the aggregated update gives it the same delta.
        current = parameters_to_ndarrays(ndarrays_to_parameters(flower.current_weights))[0]
        result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([current + delta]), 10, {})
        parameters, _ = flower.aggregate_fit(server_round, [(None, result)], [])
        expected = parameters_to_ndarrays(parameters)[0]
        assert np.array_equal(ours, current)
        ours, state = step(settings, ours, delta, state)
        np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)
        ours = expected.astype(np.float64)  # keep both on the very same trajectory
    assert state.steps == 6 and state.m is not None and state.v is not None


def test_fedavg_adds_the_aggregate_and_keeps_no_moments() -> None:
    weights, delta = np.arange(4.0), np.full(4, 0.5)
    new, state = step(ServerOptimiser(), weights, delta, OptimiserState())
    np.testing.assert_array_equal(new, weights + delta)
    assert state.m is None and state.v is None and state.steps == 1


def test_the_state_is_not_changed_in_place() -> None:
    settings = ServerOptimiser(kind="fedadam")
    first_w, first = step(settings, np.zeros(3), np.ones(3), OptimiserState())
    m_before = first.m.copy()
    step(settings, first_w, np.ones(3), first)
    np.testing.assert_array_equal(first.m, m_before)


def test_mismatched_or_non_finite_inputs_are_refused() -> None:
    settings = ServerOptimiser(kind="fedyogi")
    with pytest.raises(ServerOptimiserError, match="does not fit"):
        step(settings, np.zeros(3), np.zeros(4), OptimiserState())
    with pytest.raises(ServerOptimiserError, match="NaN"):
        step(settings, np.zeros(2), np.array([0.0, np.nan]), OptimiserState())
    with pytest.raises(ServerOptimiserError, match="state m"):
        step(settings, np.zeros(3), np.zeros(3), OptimiserState(steps=1, m=np.zeros(2),
                                                                v=np.zeros(3)))
    with pytest.raises(ValidationError):
        ServerOptimiser(kind="fedadam", beta_1=1.0)
    with pytest.raises(ValidationError):
        ServerOptimiser(kind="sgd")
