"""Nodule detection against the ground-truth nodules a spoke released
(``released["nodules"]``): lesion-level sensitivity and precision with binomial intervals;
F1, false positives per case and mean diameter error with case-level bootstrap intervals.

Resampling cases, not lesions, because the lesions of one case are not independent (one
scan's noise or contrast affects all of them); it is how FROC studies report them."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tributary.hub.aggregation.base import (
    Aggregator,
    CaseView,
    count,
    lookup,
    number,
    proportion,
    register,
)
from tributary.hub.aggregation.report import Figure
from tributary.hub.aggregation.statistics import bootstrap_ci
from tributary.hub.models import CaseState


def match_findings(findings: list[dict[str, Any]], truth: list[dict[str, Any]],
                   min_tolerance_mm: float = 3.0) -> tuple[list[tuple[dict, dict]], int, int]:
    """Greedy nearest matching of detections to ground-truth nodules. A detection matches
    a nodule whose centre lies within the nodule's radius (at least ``min_tolerance_mm``).
    Returns (matched pairs, false negatives, false positives)."""
    candidates = sorted(
        ((math.dist(f["center_mm"], t["center_mm"]), i, j)
         for i, f in enumerate(findings) for j, t in enumerate(truth)),
    )
    used_f: set[int] = set()
    used_t: set[int] = set()
    pairs = []
    for dist, i, j in candidates:
        if i in used_f or j in used_t:
            continue
        if dist <= max(truth[j]["diameter_mm"] / 2, min_tolerance_mm):
            used_f.add(i)
            used_t.add(j)
            pairs.append((findings[i], truth[j]))
    return pairs, len(truth) - len(used_t), len(findings) - len(used_f)


class DetectionParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    findings: str = Field("findings", description="Output field listing the detections.")
    truth: str = Field("nodules", description="Released attribute listing true nodules.")
    min_tolerance_mm: float = Field(3.0, ge=0, description="Smallest match radius.")
    ci_method: Literal["wilson", "clopper-pearson"] = "wilson"
    confidence: float = Field(0.95, gt=0, lt=1)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray):  # type: ignore[no-untyped-def]
    def statistic(indices: np.ndarray) -> np.ndarray:
        t, f, m = tp[indices].sum(axis=1), fp[indices].sum(axis=1), fn[indices].sum(axis=1)
        denominator = 2 * t + f + m
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, 2 * t / denominator, np.nan)
    return statistic


def _ratio(numerator: np.ndarray, denominator: np.ndarray):  # type: ignore[no-untyped-def]
    """Sum of ``numerator`` over sum of ``denominator`` in each resample of cases."""
    def statistic(indices: np.ndarray) -> np.ndarray:
        top, bottom = numerator[indices].sum(axis=1), denominator[indices].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(bottom > 0, top / bottom, np.nan)
    return statistic


def _with_bootstrap(figure: Figure, statistic, cases: int,  # type: ignore[no-untyped-def]
                    confidence: float, digits: int) -> Figure:
    """``figure`` with the percentile bootstrap interval of ``statistic`` over ``cases``."""
    if figure.value is None:
        return figure
    ci = bootstrap_ci(statistic, np.arange(cases), confidence)
    if ci.low is None or ci.high is None:
        return figure
    return figure.model_copy(update={
        "ci_low": round(ci.low, digits), "ci_high": round(ci.high, digits),
        "ci_method": "bootstrap-percentile", "confidence": confidence})


@register
class NoduleDetectionAggregator(Aggregator):
    name: ClassVar[str] = "nodule-detection"
    description: ClassVar[str] = "Detection sensitivity, precision and F1 against released nodules"
    Parameters = DetectionParameters
    labels: ClassVar[dict[str, str]] = {
        "findings": "Findings", "findings_per_case": "Findings/case",
        "truth_cases": "Cases with truth", "truth_nodules": "GT nodules",
        "true_positives": "TP", "false_negatives": "FN", "false_positives": "FP",
        "sensitivity": "Sensitivity", "precision": "Precision", "f1": "F1",
        "false_positives_per_case": "FP/case", "diameter_error_mm": "Diam. err (mm)",
    }

    def figures(self, cases: list[CaseView]) -> dict[str, Figure]:
        p: DetectionParameters = self.parameters  # type: ignore[assignment]
        done = [c for c in cases if c.state == CaseState.SUCCEEDED and c.output]
        counts = [len(lookup(c.output, p.findings) or []) for c in done]
        with_truth = [c for c in done if isinstance(lookup(c.released, p.truth), list)]
        per_case = []  # (tp, fp, fn, sum of diameter errors) per case with truth
        for case in with_truth:
            pairs, misses, extras = match_findings(lookup(case.output, p.findings) or [],
                                                   lookup(case.released, p.truth),
                                                   p.min_tolerance_mm)
            errors = sum(abs(f["diameter_mm"] - t["diameter_mm"]) for f, t in pairs)
            per_case.append((len(pairs), extras, misses, errors))
        columns = np.asarray(per_case, dtype=float).reshape(-1, 4).T
        tp, fp, fn = (int(column.sum()) for column in columns[:3])
        n_truth = len(with_truth)

        def bootstrapped(value: float | None, statistic, n: int,  # type: ignore[no-untyped-def]
                         digits: int) -> Figure:
            return _with_bootstrap(number(value, n, digits), statistic, n_truth,
                                   p.confidence, digits)

        f1 = bootstrapped(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None,
                          _f1(*columns[:3]), n_truth, 4)
        fp_per_case = bootstrapped(fp / n_truth if n_truth else None,
                                   _ratio(columns[1], np.ones(n_truth)), n_truth, 3)
        diameter_error = bootstrapped(columns[3].sum() / tp if tp else None,
                                      _ratio(columns[3], columns[0]), min(tp, n_truth), 2)
        # Lesion-level proportions are computed over the lesions but disclose the cases
        # they come from, so their n (for suppression) is the number of cases with truth.
        sensitivity = proportion(tp, tp + fn, p.ci_method, p.confidence)
        precision = proportion(tp, tp + fp, p.ci_method, p.confidence)
        return {
            "findings": Figure(value=sum(counts), n=len(done)),
            "findings_per_case": number(sum(counts) / len(counts) if counts else None,
                                        len(counts), 3),
            "truth_cases": count(n_truth),
            "truth_nodules": Figure(value=tp + fn, n=n_truth),
            "true_positives": Figure(value=tp, n=n_truth),
            "false_negatives": Figure(value=fn, n=n_truth),
            "false_positives": Figure(value=fp, n=n_truth),
            "sensitivity": sensitivity.model_copy(update={"n": min(sensitivity.n, n_truth)}),
            "precision": precision.model_copy(update={"n": min(precision.n, n_truth)}),
            "f1": f1,
            "false_positives_per_case": fp_per_case,
            "diameter_error_mm": diameter_error,
        }
