"""The aggregators' figures on known inputs, each checked against an independent
computation: scikit-learn for the AUC and ROC, a direct O(m·n) DeLong in numpy/SciPy for
the AUC interval, SciPy's beta distribution for Clopper-Pearson, textbook formulas for
Wilson and the t interval."""

from __future__ import annotations

import math
import statistics
from typing import Any, ClassVar

import numpy as np
import pytest
from pydantic import BaseModel
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from tributary.hub.aggregation import (
    AGGREGATORS,
    AggregatorParameterError,
    CaseView,
    Figure,
    get_aggregator,
    register,
    run,
)
from tributary.hub.aggregation.base import Aggregator
from tributary.hub.aggregation.statistics import auc_delong
from tributary.hub.aggregation.statistics import roc_curve as own_roc_curve
from tributary.hub.models import CaseState


def case(spoke: str, i: int, output: dict[str, Any] | None, released: dict[str, Any] | None,
         state: CaseState = CaseState.SUCCEEDED) -> CaseView:
    return CaseView(spoke, f"c-{spoke}-{i}", state, output, released or {}, None)


def scored(spoke: str, scores: list[float], labels: list[int]) -> list[CaseView]:
    return [case(spoke, i, {"prediction": {"p": s}}, {"diagnosis": y})
            for i, (s, y) in enumerate(zip(scores, labels, strict=True))]


def delong_direct(scores: np.ndarray, labels: np.ndarray, confidence: float = 0.95):  # type: ignore[no-untyped-def]
    """DeLong et al. (1988) straight from its definition: the Mann-Whitney kernel over every
    positive-negative pair, structural components, their variances."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = kernel.mean()
    v10, v01 = kernel.mean(axis=1), kernel.mean(axis=0)
    se = math.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    z = stats.norm.ppf(0.5 + confidence / 2)
    return auc, max(0.0, auc - z * se), min(1.0, auc + z * se)


def wilson(successes: int, n: int, z: float = stats.norm.ppf(0.975)) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.fixture
def dataset() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    labels = (rng.random(120) < 0.35).astype(int)
    scores = np.round(rng.normal(labels * 1.1, 1.0), 1)  # rounding makes ties
    return scores, labels


def test_auc_and_delong_interval_match_independent_computations(dataset) -> None:  # type: ignore[no-untyped-def]
    scores, labels = dataset
    estimate = auc_delong(scores.tolist(), (labels == 1).tolist())
    auc, low, high = delong_direct(scores, labels)
    assert estimate.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert estimate.auc == pytest.approx(auc, abs=1e-12)
    assert (estimate.low, estimate.high) == pytest.approx((low, high), abs=1e-12)
    assert estimate.low < estimate.auc < estimate.high


def test_binary_classification_figures(dataset) -> None:  # type: ignore[no-untyped-def]
    scores, labels = dataset
    cases = scored("north", scores[:70].tolist(), labels[:70].tolist()) + scored(
        "river", scores[70:].tolist(), labels[70:].tolist())
    cases.append(case("river", 999, {"prediction": {}}, {"diagnosis": 1}))  # no score
    cases.append(case("river", 998, None, {"diagnosis": 0}, CaseState.FAILED))
    aggregator = get_aggregator("binary-classification", {
        "score": "prediction.p", "label": "diagnosis", "threshold": 0.5})
    result = run(aggregator, ["north", "river"], cases, min_cell_size=5)
    assert list(result.groups) == ["north", "river", "pooled"]
    for name, sl in (("north", slice(0, 70)), ("river", slice(70, None)),
                     ("pooled", slice(None))):
        s, y = scores[sl], labels[sl]
        g = result.groups[name].figures
        tp = int(((s >= 0.5) & (y == 1)).sum())
        tn = int(((s < 0.5) & (y == 0)).sum())
        positives, negatives = int(y.sum()), int((1 - y).sum())
        assert (g["true_positives"].value, g["true_negatives"].value) == (tp, tn)
        assert g["sensitivity"].value == round(tp / positives, 4)
        assert g["specificity"].value == round(tn / negatives, 4)
        assert (g["sensitivity"].ci_low, g["sensitivity"].ci_high) == pytest.approx(
            wilson(tp, positives), abs=1e-4)
        assert g["sensitivity"].ci_method == "wilson"
        assert g["auc"].value == pytest.approx(roc_auc_score(y, s), abs=1e-4)
        _, low, high = delong_direct(s, y)
        assert (g["auc"].ci_low, g["auc"].ci_high) == pytest.approx((low, high), abs=1e-4)
        assert g["auc"].n == min(positives, negatives)
        # ROC points, for plots, equal scikit-learn's (corners of the curve).
        fpr, tpr, _ = roc_curve(y, s)
        points = result.groups[name].roc.points
        assert [p.fpr for p in points] == pytest.approx(fpr.tolist(), abs=1e-6)
        assert [p.tpr for p in points] == pytest.approx(tpr.tolist(), abs=1e-6)
    unusable = result.groups["river"].figures["unusable"]  # one case: a small cell
    assert (unusable.value, unusable.n, unusable.suppressed) == (None, None,
                                                                 "fewer than 5 cases")
    assert result.groups["river"].failed == 1


def test_roc_keeps_every_threshold_on_request(dataset) -> None:  # type: ignore[no-untyped-def]
    scores, labels = dataset
    points = own_roc_curve(scores.tolist(), (labels == 1).tolist(), drop_intermediate=False)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    assert [p[1] for p in points] == pytest.approx(fpr.tolist(), abs=1e-6)
    assert [p[2] for p in points] == pytest.approx(tpr.tolist(), abs=1e-6)
    assert [p[0] for p in points[1:]] == pytest.approx(thresholds[1:].tolist())
    assert points[0] == (None, 0.0, 0.0) and points[-1][1:] == (1.0, 1.0)


def test_clopper_pearson_interval() -> None:
    labels = [1] * 20 + [0] * 10
    scores = [0.9] * 17 + [0.1] * 3 + [0.2] * 10
    aggregator = get_aggregator("binary-classification", {
        "score": "prediction.p", "label": "diagnosis", "ci_method": "clopper-pearson"})
    figure = run(aggregator, ["a"], scored("a", scores, labels), 5).groups["a"].figures[
        "sensitivity"]
    assert figure.value == 0.85 and figure.ci_method == "clopper-pearson"
    exact = (stats.beta.ppf(0.025, 17, 4), stats.beta.ppf(0.975, 18, 3))
    assert (figure.ci_low, figure.ci_high) == pytest.approx(exact, abs=1e-4)


def test_string_labels_and_own_prediction() -> None:
    cases = [case("a", i, {"malignant": i % 2 == 0, "p": i / 10},
                  {"histology": "malignant" if i < 6 else "benign"}) for i in range(10)]
    aggregator = get_aggregator("binary-classification", {
        "score": "p", "label": "histology", "positive": "malignant", "prediction": "malignant"})
    figures = run(aggregator, ["a"], cases, 1).groups["a"].figures
    # called positive: even i; truly positive: i < 6 -> TP = {0, 2, 4}, FP = {6, 8}
    assert figures["true_positives"].value == 3 and figures["false_positives"].value == 2
    assert figures["auc"].value == pytest.approx(
        roc_auc_score([i < 6 for i in range(10)], [i / 10 for i in range(10)]))


def test_summary_statistics_of_numeric_outputs() -> None:
    volumes = [12.5, 3.0, 7.25, 9.0, 4.5, 30.0, 11.0]
    cases = [case("a", i, {"volume_ml": v, "ok": True, "tags": [1, 2], "nested": {"x": i}},
                  None) for i, v in enumerate(volumes)]
    cases.append(case("a", 99, {"volume_ml": "n/a"}, None))  # not a number: not counted
    figures = run(get_aggregator("summary"), ["a"], cases, 5).groups["a"].figures
    assert set(figures) == {f"{k}.{s}" for k in ("volume_ml", "nested.x")
                            for s in ("n", "mean", "sd", "q1", "median", "q3")}
    assert figures["volume_ml.n"].value == 7
    assert figures["volume_ml.mean"].value == pytest.approx(statistics.mean(volumes))
    assert figures["volume_ml.sd"].value == pytest.approx(statistics.stdev(volumes))
    assert figures["volume_ml.median"].value == statistics.median(volumes)
    half = stats.t.ppf(0.975, 6) * statistics.stdev(volumes) / math.sqrt(7)
    mean = statistics.mean(volumes)
    assert (figures["volume_ml.mean"].ci_low, figures["volume_ml.mean"].ci_high) == \
        pytest.approx((mean - half, mean + half), abs=1e-5)


def nodule(x: float, d: float = 8.0) -> dict[str, Any]:
    return {"center_mm": [x, 0.0, 0.0], "diameter_mm": d}


def test_detection_sensitivity_precision_f1() -> None:
    cases = []
    for i in range(6):  # each case: 2 true nodules; finds the first, plus one false positive
        cases.append(case("a", i, {"findings": [nodule(0, 7.0), nodule(90)]},
                          {"nodules": [nodule(0), nodule(50)]}))
    figures = run(get_aggregator("nodule-detection"), ["a"], cases, 5).groups["a"].figures
    tp, fn, fp = 6, 6, 6
    assert figures["sensitivity"].value == tp / (tp + fn) == figures["precision"].value
    assert (figures["sensitivity"].ci_low, figures["sensitivity"].ci_high) == \
        pytest.approx(wilson(6, 12), abs=1e-4)
    assert figures["f1"].value == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # every case is identical, so every bootstrap resample has the same F1
    assert figures["f1"].ci_low == figures["f1"].ci_high == figures["f1"].value
    assert figures["f1"].ci_method == "bootstrap-percentile"
    assert figures["diameter_error_mm"].value == 1.0
    assert figures["false_positives_per_case"].value == 1.0


def test_detection_intervals_of_fp_rate_and_diameter_error() -> None:
    # 300 cases with Poisson false positives (mean 0.8) and one found nodule each, its
    # diameter off by a normal error: the case bootstrap should agree with the textbook
    # intervals for independent cases, Garwood's exact Poisson interval for the rate and
    # the t interval for the mean error.
    rng = np.random.default_rng(7)
    fps = rng.poisson(0.8, 300)
    errors = np.abs(rng.normal(0.0, 1.0, 300)) + 0.5
    cases = [case("a", i, {"findings": [nodule(0, 8.0 + e)] + [nodule(200 + 20 * k)
                                                               for k in range(f)]},
                  {"nodules": [nodule(0)]}) for i, (f, e) in enumerate(zip(fps, errors,
                                                                           strict=True))]
    figures = run(get_aggregator("nodule-detection"), ["a"], cases, 5).groups["a"].figures
    rate = figures["false_positives_per_case"]
    k, n = int(fps.sum()), len(fps)
    garwood = (stats.chi2.ppf(0.025, 2 * k) / 2 / n, stats.chi2.ppf(0.975, 2 * k + 2) / 2 / n)
    assert rate.value == pytest.approx(k / n, abs=1e-3)
    assert rate.ci_method == "bootstrap-percentile" and rate.confidence == 0.95
    assert (rate.ci_low, rate.ci_high) == pytest.approx(garwood, abs=0.02)
    diameter = figures["diameter_error_mm"]
    t_low, t_high = stats.t.interval(0.95, n - 1, loc=errors.mean(), scale=stats.sem(errors))
    assert diameter.value == pytest.approx(errors.mean(), abs=0.01)
    assert (diameter.ci_low, diameter.ci_high) == pytest.approx((t_low, t_high), abs=0.02)
    assert diameter.ci_low < diameter.value < diameter.ci_high


def test_detection_f1_bootstrap_is_reproducible() -> None:
    cases = [case("a", i, {"findings": [nodule(0)] * (i % 3)},
                  {"nodules": [nodule(0), nodule(40)][: 1 + i % 2]}) for i in range(20)]
    first = run(get_aggregator("nodule-detection"), ["a"], cases, 5).groups["a"]
    second = run(get_aggregator("nodule-detection"), ["a"], cases, 5).groups["a"]
    f1 = first.figures["f1"]
    assert f1 == second.figures["f1"]
    assert f1.ci_low is not None and f1.ci_low <= f1.value <= f1.ci_high


def test_small_cells_are_suppressed_per_spoke_and_pooled() -> None:
    big = scored("big", [0.9, 0.8, 0.3, 0.7, 0.6, 0.2, 0.1, 0.4, 0.35, 0.05, 0.95, 0.15],
                 [1, 1, 0, 1, 1, 0, 0, 0, 1, 0, 1, 0])
    small = scored("small", [0.9, 0.1, 0.8], [1, 0, 1])
    aggregator = get_aggregator("binary-classification", {"score": "prediction.p",
                                                          "label": "diagnosis"})
    groups = run(aggregator, ["big", "small"], big + small, min_cell_size=5).groups
    for key in ("sensitivity", "specificity", "auc", "true_positives", "positives"):
        figure = groups["small"].figures[key]
        assert figure.value is None and figure.ci_low is None
        assert figure.suppressed == "fewer than 5 cases"
    assert groups["small"].roc.points == [] and groups["small"].roc.positives is None
    assert groups["small"].roc.suppressed == "fewer than 5 cases"
    # the only other spoke is withheld too, so pooled minus big cannot give small back
    assert groups["big"].figures["sensitivity"].suppressed.startswith("withheld so that")
    assert groups["pooled"].figures["sensitivity"].value is not None
    assert groups["big"].roc.points
    # pooled: 8 positives and 7 negatives, enough for everything
    assert groups["pooled"].figures["auc"].suppressed is None
    # with k = 8 the pooled negatives (7) are too few for specificity and the AUC
    pooled = run(aggregator, ["big", "small"], big + small, min_cell_size=8).groups["pooled"]
    assert pooled.figures["specificity"].suppressed == "fewer than 8 cases"
    assert pooled.figures["sensitivity"].value is not None
    assert pooled.figures["auc"].value is None and pooled.roc.points == []


def test_parameters_are_validated_with_clear_messages() -> None:
    with pytest.raises(AggregatorParameterError, match="ci_method"):
        get_aggregator("binary-classification", {"ci_method": "jeffreys"})
    with pytest.raises(AggregatorParameterError, match="scroe"):
        get_aggregator("binary-classification", {"scroe": "p"})
    with pytest.raises(ValueError, match="unknown aggregator 'nope'"):
        get_aggregator("nope")


def test_a_new_aggregator_registers_by_name() -> None:
    class Threshold(BaseModel):
        field: str = "volume_ml"
        above: float = 10.0

    @register
    class CountAbove(Aggregator):
        name: ClassVar[str] = "test-count-above"
        Parameters = Threshold

        def figures(self, cases: list[CaseView]) -> dict[str, Figure]:
            p: Threshold = self.parameters  # type: ignore[assignment]
            values = [c.output[p.field] for c in cases if c.output and p.field in c.output]
            hits = sum(v > p.above for v in values)
            return {"above": Figure(value=hits, n=len(values))}

    try:
        cases = [case("a", i, {"volume_ml": v}, None) for i, v in enumerate([5, 11, 12, 30])]
        groups = run(get_aggregator("test-count-above", {"above": 11.5}), ["a"], cases, 1).groups
        assert groups["a"].figures["above"].value == 2
        assert groups["pooled"].cases == 4
    finally:
        AGGREGATORS.pop("test-count-above")
