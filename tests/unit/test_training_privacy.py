"""The privacy accountant (tributary.protocol.training.privacy) against dp-accounting."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from tributary.protocol.training import privacy as pv


def _reference(rounds: int, z: float, delta: float, q: float = 1.0) -> float:
    """The same mechanism built directly: Gaussian with sensitivity 2C, sd zC."""
    event = dp_accounting.GaussianDpEvent(z / 2)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("rounds", "z", "q"), [(1, 1.0, 1.0), (20, 2.5, 1.0), (50, 4.0, 0.3)])
def test_epsilon_matches_dp_accounting(rounds: int, z: float, q: float) -> None:
    assert pv.epsilon_after(rounds, z, 1e-5, q) == pytest.approx(_reference(rounds, z, 1e-5, q))


def test_ledger_per_round_and_cumulative() -> None:
    ledger = pv.PrivacyLedger(delta=1e-6)
    charge = pv.RoundCharge(noise_multiplier=3.0)
    assert ledger.epsilon() == 0.0
    values = [ledger.record(charge) for _ in range(5)]
    assert values == sorted(values) and values[0] < values[-1]
    assert values[-1] == pytest.approx(_reference(5, 3.0, 1e-6))
    assert ledger.round_epsilon(0) == pytest.approx(values[0])
    again = pv.PrivacyLedger.model_validate_json(ledger.model_dump_json())
    assert again.epsilon() == pytest.approx(values[-1])


def test_study_epsilon_is_the_most_spent() -> None:
    charge = pv.RoundCharge(noise_multiplier=3.0)
    ledgers = {"a": pv.PrivacyLedger(delta=1e-5, charges=[charge] * 4),
               "b": pv.PrivacyLedger(delta=1e-5, charges=[charge] * 2)}
    assert pv.study_epsilon(ledgers) == pytest.approx(pv.epsilon_after(4, 3.0, 1e-5))
    assert pv.study_epsilon({}) == 0.0


def test_site_cap() -> None:
    ledger = pv.PrivacyLedger(delta=1e-5)
    charge = pv.RoundCharge(noise_multiplier=3.0)
    cap = pv.epsilon_after(3, 3.0, 1e-5)
    joined = 0
    while pv.may_join(ledger, charge, cap):
        ledger.record(charge)
        joined += 1
    assert joined == 3 and ledger.epsilon() <= cap


def test_bad_parameters() -> None:
    with pytest.raises(pv.PrivacyError):
        pv.epsilon_after(3, 0.0, 1e-5)
    with pytest.raises(pv.PrivacyError):
        pv.epsilon_after(3, 1.0, 1.5)
