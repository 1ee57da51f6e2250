"""What the results section of an experiment's page shows: plain data for the plots in
:mod:`tributary.hub.services.plots`, taken from the aggregate report (``GET
/api/experiments/{id}/aggregate``) and the cases (``GET /api/experiments/{id}/cases``).

Suppressed groups (small cells) are never plotted: a group whose figures say
``"suppressed": true`` is left out of every figure, and its cases' outputs too."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tributary.hub.api.schemas import CaseRead, ExperimentRead
from tributary.hub.services import plots

POOLED = "pooled"
Z95 = 1.959963984540054


@dataclass
class ResultsView:
    groups: list[dict[str, Any]]  # rows of the aggregate table
    columns: list[dict[str, str]]
    suppressed: list[str]
    quantities: list[str]
    quantity: str | None
    figures: dict[str, str] = field(default_factory=dict)  # title -> inline SVG


def is_suppressed(figures: Any) -> bool:
    return not isinstance(figures, dict) or bool(figures.get("suppressed"))


def numeric_outputs(cases: list[CaseRead]) -> list[str]:
    """Top-level numeric output fields, most common first."""
    seen: Counter[str] = Counter()
    for case in cases:
        for key, value in (case.output or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                seen[key] += 1
    return [key for key, _ in seen.most_common()]


def wilson(successes: int, trials: int) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion (behaves at 0 and 1, unlike Wald's)."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denominator = 1 + Z95**2 / trials
    centre = (p + Z95**2 / (2 * trials)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / trials + Z95**2 / (4 * trials**2)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def forest_rows(groups: dict[str, Any]) -> tuple[str, list[plots.Estimate]] | None:
    """The forest plot's rows: a metric with its interval per group. Uses intervals the
    report carries (``"<metric>_ci": [low, high]``); otherwise sensitivity with a Wilson
    interval from true positives and false negatives."""
    rows: list[plots.Estimate] = []
    metric = next((k[:-3] for figures in groups.values() if isinstance(figures, dict)
                   for k in figures if k.endswith("_ci")), None)
    for name, figures in groups.items():
        if is_suppressed(figures):
            continue
        if metric is not None:
            interval, value = figures.get(f"{metric}_ci"), figures.get(metric)
            if value is not None and interval and None not in interval:
                rows.append(plots.Estimate(name, float(value), float(interval[0]),
                                           float(interval[1]), figures.get("cases")))
            continue
        tp, fn = figures.get("true_positives"), figures.get("false_negatives")
        if isinstance(tp, int) and isinstance(fn, int) and tp + fn > 0:
            low, high = wilson(tp, tp + fn)
            rows.append(plots.Estimate(name, tp / (tp + fn), low, high, tp + fn))
    if not rows:
        return None
    rows.sort(key=lambda r: r.label == POOLED)  # pooled last
    return (metric or "sensitivity", rows)


def roc_points(scored: list[tuple[float, bool]]) -> list[tuple[float, float]]:
    """Empirical ROC points (FPR, TPR) over every threshold of ``(score, positive)``."""
    positives = sum(1 for _, p in scored if p)
    negatives = len(scored) - positives
    if positives == 0 or negatives == 0:
        return []
    points = [(0.0, 0.0)]
    tp = fp = 0
    ordered = sorted(scored, key=lambda s: -s[0])
    for index, (score, positive) in enumerate(ordered):
        tp, fp = tp + positive, fp + (not positive)
        if index + 1 == len(ordered) or ordered[index + 1][0] != score:
            points.append((fp / negatives, tp / positives))
    return points


def auc(points: list[tuple[float, float]]) -> float | None:
    if not points:
        return None
    ordered = sorted(points)
    return sum((x2 - x1) * (y1 + y2) / 2
               for (x1, y1), (x2, y2) in itertools.pairwise(ordered))


def roc_curves(groups: dict[str, Any], cases: list[CaseRead]
               ) -> dict[str, list[tuple[float, float]]]:
    """ROC points per group: from the report (``"roc": [[fpr, tpr], ...]``) when it has
    them; otherwise case-level detection, where a case is positive when its released ground
    truth lists a nodule and its score is its largest finding's diameter."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for name, figures in groups.items():
        if not is_suppressed(figures) and figures.get("roc"):
            curves[name] = [(float(x), float(y)) for x, y in figures["roc"]]
    if curves:
        return curves
    scored: dict[str, list[tuple[float, bool]]] = {}
    for case in cases:
        truth = case.released.get("nodules")
        if case.state != "succeeded" or not case.output or not isinstance(truth, list):
            continue
        findings = case.output.get("findings")
        if not isinstance(findings, list):
            continue
        score = max((float(f.get("diameter_mm", 0)) for f in findings), default=0.0)
        scored.setdefault(case.spoke_id, []).append((score, bool(truth)))
    visible = {s: v for s, v in scored.items() if not is_suppressed(groups.get(s))}
    for spoke, values in visible.items():
        curves[spoke] = roc_points(values)
    if visible and not is_suppressed(groups.get(POOLED, {})):
        curves[POOLED] = roc_points([v for values in visible.values() for v in values])
    return {name: points for name, points in curves.items() if points}


def results_view(experiment: ExperimentRead, report: dict[str, Any], cases: list[CaseRead],
                 quantity: str | None = None) -> ResultsView:
    groups: dict[str, Any] = report.get("groups", {})
    suppressed = [name for name, figures in groups.items() if is_suppressed(figures)]
    visible_cases = [c for c in cases if not is_suppressed(groups.get(c.spoke_id, {}))]
    quantities = numeric_outputs(visible_cases)
    if quantity not in quantities:
        quantity = quantities[0] if quantities else None
    view = ResultsView(
        groups=[{"name": name, "figures": figures, "suppressed": name in suppressed}
                for name, figures in groups.items()],
        columns=report.get("columns", []), suppressed=suppressed, quantities=quantities,
        quantity=quantity)
    view.figures["Progress per spoke"] = plots.progress_bars([
        plots.SpokeProgress(t.spoke_id, t.succeeded, t.failed, t.running, t.queued,
                            t.case_count) for t in experiment.targets])
    if quantity is not None:
        values: dict[str, list[float]] = {}
        for case in visible_cases:
            value = (case.output or {}).get(quantity)
            if case.state == "succeeded" and isinstance(value, int | float):
                values.setdefault(case.spoke_id, []).append(float(value))
        view.figures[f"Distribution of {quantity}"] = plots.distribution(values, quantity)
    curves = roc_curves(groups, cases)
    if curves:
        view.figures["ROC curves"] = plots.roc_curves(
            curves, {name: auc(points) for name, points in curves.items()})
    forest = forest_rows(groups)
    if forest is not None:
        view.figures[f"{forest[0].capitalize()} per spoke"] = plots.forest(forest[1], forest[0])
    return view
