"""Summary statistics of every numeric output field: n, mean with its t interval, standard
deviation, median and quartiles. No minimum or maximum: each is one case's value."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tributary.hub.aggregation.base import Aggregator, CaseView, finite, number, register
from tributary.hub.aggregation.partial import Sums, exact, exact_square, moments, total
from tributary.hub.aggregation.report import Figure
from tributary.hub.aggregation.statistics import mean_ci_from_moments
from tributary.hub.models import CaseState


class SummaryParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fields: list[str] | None = Field(
        None, description="Dotted output fields to summarise; default every numeric one.")
    confidence: float = Field(0.95, gt=0, lt=1)


def numeric_fields(data: Any, prefix: str = "") -> dict[str, float]:
    """Numbers of a JSON object by dotted key (booleans and lists are not numbers here)."""
    found: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            found.update(numeric_fields(value, f"{prefix}{key}."))
    elif (number := finite(data)) is not None:
        found[prefix[:-1]] = number
    return found


_FROM_SUMS = ("n", "mean", "sd")
_FROM_ALL = ("q1", "median", "q3")


@register
class SummaryAggregator(Aggregator):
    name: ClassVar[str] = "summary"
    description: ClassVar[str] = "Cases by state and summary statistics of numeric outputs"
    Parameters = SummaryParameters
    incremental: ClassVar[bool] = True

    def _values(self, cases: list[CaseView]) -> dict[str, list[float]]:
        values: dict[str, list[float]] = {}
        for case in cases:
            if case.state != CaseState.SUCCEEDED or not case.output:
                continue
            for key, value in numeric_fields(case.output).items():
                values.setdefault(key, []).append(value)
        return values

    def contribution(self, case: CaseView) -> Sums:
        if case.state != CaseState.SUCCEEDED or not case.output:
            return {}
        sums: Sums = {}
        for key, value in numeric_fields(case.output).items():
            sums.update({f"n:{key}": 1, f"s:{key}": exact(value),
                         f"q:{key}": exact_square(value)})
        return sums

    def sum_figures(self, sums: Sums) -> dict[str, Figure]:
        params: SummaryParameters = self.parameters  # type: ignore[assignment]
        present = sorted(k[2:] for k in sums if k.startswith("n:"))
        figures: dict[str, Figure] = {}
        for key in params.fields if params.fields is not None else present:
            n = sums.get(f"n:{key}", 0)
            mean, variance = moments(n, sums.get(f"s:{key}", 0), sums.get(f"q:{key}", 0))
            sd = None if variance is None else math.sqrt(variance)
            ci = mean_ci_from_moments(n, mean, sd, params.confidence)
            figures[f"{key}.n"] = Figure(value=n, n=n)
            figures[f"{key}.mean"] = Figure(
                value=None if mean is None else round(mean, 6), n=n,
                ci_low=None if ci.low is None else round(ci.low, 6),
                ci_high=None if ci.high is None else round(ci.high, 6),
                ci_method="student-t" if ci.low is not None else None,
                confidence=params.confidence if ci.low is not None else None)
            figures[f"{key}.sd"] = number(sd, n, 6)
        return figures

    def full_figures(self, cases: list[CaseView]) -> dict[str, Figure]:
        params: SummaryParameters = self.parameters  # type: ignore[assignment]
        values = self._values(cases)
        figures: dict[str, Figure] = {}
        for key in params.fields if params.fields is not None else sorted(values):
            data = np.asarray(values.get(key, []), dtype=float)
            n = len(data)
            quartiles = np.quantile(data, [0.25, 0.5, 0.75]) if n else [None] * 3
            for label, q in zip(_FROM_ALL, quartiles, strict=True):
                figures[f"{key}.{label}"] = number(None if q is None else float(q), n, 6)
        return figures

    def merge(self, from_sums: dict[str, Figure],
              from_full: dict[str, Figure]) -> dict[str, Figure]:
        params: SummaryParameters = self.parameters  # type: ignore[assignment]
        both = {**from_sums, **from_full}
        fields = params.fields if params.fields is not None else sorted(
            {key.rsplit(".", 1)[0] for key in both})
        return {f"{field}.{label}": both[f"{field}.{label}"] for field in fields
                for label in _FROM_SUMS + _FROM_ALL if f"{field}.{label}" in both}

    def figures(self, cases: list[CaseView]) -> dict[str, Figure]:
        return self.merge(self.sum_figures(total(self.contribution(c) for c in cases)),
                          self.full_figures(cases))
