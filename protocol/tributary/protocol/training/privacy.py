"""Differential-privacy accounting for training studies (dp-accounting's RDP accountant).

The guarantee is **local, per spoke, at site level**. In every round a spoke takes part in,
it releases ``clip(update, C) + N(0, (z C)^2 I)`` (then quantised and masked: both
post-processing). The clipped update of any dataset of that site lies in the L2 ball of
radius C, so two different datasets of the site (in particular any two differing in one
record) change it by at most 2C: a Gaussian mechanism with sensitivity 2C and standard
deviation zC, i.e. an effective noise multiplier ``z / 2`` in dp-accounting's terms
(:func:`effective_noise_multiplier`). Composition over the rounds the spoke joined gives
its (epsilon, delta).

Why local: the guarantee holds for each spoke's update on its own, whatever the other
spokes do: if they drop out, collude with the hub or add no noise, and even if secure
aggregation were broken. SecAgg+ means the hub in fact only sees a sum carrying the noise
of every survivor (sigma * sqrt(n)), a stronger guarantee we do not claim. Dropouts
therefore do not weaken the accounted guarantee; a spoke that dropped before sending its
masked input released nothing that round (its mask key is rebuilt, its self mask never is)
but is still charged for it if the orchestration cannot prove it released nothing, which
is the conservative choice.

Subsampling: ``sampling_probability`` below 1 applies privacy amplification for Poisson
sampling, valid only when each spoke joins each round independently with that
probability by a draw the adversary does not see. When the hub picks participants it
knows who took part, so the hub and spoke account with ``1.0`` (the default).
"""

from __future__ import annotations

import math

import dp_accounting
from dp_accounting.rdp import RdpAccountant
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class PrivacyError(ValueError):
    """Parameters the accountant cannot use."""


def effective_noise_multiplier(noise_multiplier: float) -> float:
    """``z / 2``: sigma = zC over the sensitivity 2C of a site's clipped update."""
    if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
        raise PrivacyError(f"noise multiplier must be positive and finite: {noise_multiplier}")
    return noise_multiplier / 2.0


class RoundCharge(BaseModel):
    """The privacy cost of one round to one spoke (or, identically, to every participant)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    sampling_probability: float = Field(1.0, gt=0, le=1)

    def event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event of this round."""
        gaussian = dp_accounting.GaussianDpEvent(effective_noise_multiplier(self.noise_multiplier))
        if self.sampling_probability >= 1.0:
            return gaussian
        return dp_accounting.PoissonSampledDpEvent(self.sampling_probability, gaussian)


def epsilon(charges: list[RoundCharge], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of ``charges`` (RDP accountant, its default
    orders). No rounds cost nothing."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1): {delta}")
    if not charges:
        return 0.0
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent([c.event() for c in charges]))
    return float(accountant.get_epsilon(delta))


def epsilon_after(
    rounds: int, noise_multiplier: float, delta: float, sampling_probability: float = 1.0
) -> float:
    """Epsilon at ``delta`` after ``rounds`` identical rounds."""
    if rounds < 0:
        raise PrivacyError(f"negative number of rounds: {rounds}")
    try:
        charge = RoundCharge(noise_multiplier=noise_multiplier,
                             sampling_probability=sampling_probability)
    except ValidationError as exc:
        raise PrivacyError(str(exc)) from exc
    return epsilon([charge] * rounds, delta)


class PrivacyLedger(BaseModel):
    """The rounds charged to one spoke in one study (the hub keeps one per spoke and one
    for the study; a spoke keeps its own). Stored as JSON with the study."""

    model_config = ConfigDict(extra="forbid")

    delta: float = Field(gt=0, lt=1)
    charges: list[RoundCharge] = []

    def epsilon(self) -> float:
        """Cumulative epsilon so far."""
        return epsilon(self.charges, self.delta)

    def epsilon_if(self, charge: RoundCharge) -> float:
        """Cumulative epsilon if one more round with ``charge`` is taken."""
        return epsilon([*self.charges, charge], self.delta)

    def round_epsilon(self, index: int) -> float:
        """Epsilon of round ``index`` alone (for the per-round display)."""
        return epsilon([self.charges[index]], self.delta)

    def record(self, charge: RoundCharge) -> float:
        """Charge a round; returns the new cumulative epsilon."""
        self.charges.append(charge)
        return self.epsilon()


def study_epsilon(ledgers: dict[str, PrivacyLedger]) -> float:
    """The study's cumulative epsilon: that of the spoke that spent most (every participant
    of a round is charged the same, so this is the spoke that joined the most rounds)."""
    return max((ledger.epsilon() for ledger in ledgers.values()), default=0.0)


def may_join(ledger: PrivacyLedger, charge: RoundCharge, cap: float) -> bool:
    """A spoke's site policy: join a round only if the cumulative epsilon after it stays
    within ``cap`` (the most this site will ever spend on the study)."""
    return ledger.epsilon_if(charge) <= cap
