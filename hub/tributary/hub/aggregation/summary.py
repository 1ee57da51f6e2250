"""Summary statistics of every numeric output field: n, mean with its t interval, standard
deviation, median and quartiles. No minimum or maximum: each is one case's value."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tributary.hub.aggregation.base import Aggregator, CaseView, number, register
from tributary.hub.aggregation.report import Figure
from tributary.hub.aggregation.statistics import mean_ci
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
    elif isinstance(data, int | float) and not isinstance(data, bool) and np.isfinite(data):
        found[prefix[:-1]] = float(data)
    return found


@register
class SummaryAggregator(Aggregator):
    name: ClassVar[str] = "summary"
    description: ClassVar[str] = "Cases by state and summary statistics of numeric outputs"
    Parameters = SummaryParameters

    def figures(self, cases: list[CaseView]) -> dict[str, Figure]:
        params: SummaryParameters = self.parameters  # type: ignore[assignment]
        values: dict[str, list[float]] = {}
        for case in cases:
            if case.state != CaseState.SUCCEEDED or not case.output:
                continue
            for key, value in numeric_fields(case.output).items():
                values.setdefault(key, []).append(value)
        keys = params.fields if params.fields is not None else sorted(values)
        figures: dict[str, Figure] = {}
        for key in keys:
            data = np.asarray(values.get(key, []), dtype=float)
            n = len(data)
            ci = mean_ci(data.tolist(), params.confidence)
            figures[f"{key}.n"] = Figure(value=n, n=n)
            figures[f"{key}.mean"] = Figure(
                value=round(float(data.mean()), 6) if n else None, n=n,
                ci_low=None if ci.low is None else round(ci.low, 6),
                ci_high=None if ci.high is None else round(ci.high, 6),
                ci_method="student-t" if ci.low is not None else None,
                confidence=params.confidence if ci.low is not None else None)
            figures[f"{key}.sd"] = number(float(data.std(ddof=1)) if n > 1 else None, n, 6)
            quartiles = np.quantile(data, [0.25, 0.5, 0.75]) if n else [None] * 3
            for label, q in zip(("q1", "median", "q3"), quartiles, strict=True):
                figures[f"{key}.{label}"] = number(None if q is None else float(q), n, 6)
        return figures
