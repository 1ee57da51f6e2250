"""What the results section of an experiment's page shows: the aggregate report (``GET
/api/experiments/{id}/aggregate``, already small-cell suppressed by the aggregation engine)
as a table, and plain data for the plots in :mod:`tributary.hub.services.plots`.

Suppressed figures are never plotted: a group whose ROC curve or forest-plot figure is
suppressed is left out of that plot, and a spoke with fewer finished cases than the
suppression threshold k is left out of the distribution of outputs."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from tributary.hub.aggregation.report import POOLED, AggregateRead, Figure
from tributary.hub.schemas import CaseRead, ExperimentRead
from tributary.hub.services import plots

#: Case counts every group reports, shown before the aggregator's own figures.
COUNT_COLUMNS = [("cases", "Cases"), ("succeeded", "Done"), ("failed", "Failed"),
                 ("pending", "Pending")]


@dataclass
class Cell:
    text: str
    interval: str = ""
    suppressed: str | None = None


@dataclass
class ResultsView:
    columns: list[str]  # headings of the aggregate table
    rows: list[tuple[str, list[Cell]]]
    report: AggregateRead
    quantities: list[str]
    quantity: str | None
    metrics: list[str]
    metric: str | None
    intervals: str = ""  # the interval levels and methods in use, for the table's legend
    figures: dict[str, str] = field(default_factory=dict)  # title -> inline SVG


def _format(value: float | int | None) -> str:
    if value is None:
        return "\u2013"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3g}"
    return str(int(value)) if isinstance(value, float) else str(value)


def cell(figure: Figure | None) -> Cell:
    if figure is None:
        return Cell("\u2013")
    if figure.suppressed:
        return Cell("suppressed", suppressed=figure.suppressed)
    interval = ""
    if figure.ci_low is not None and figure.ci_high is not None:
        interval = f"[{_format(figure.ci_low)}, {_format(figure.ci_high)}]"
    return Cell(_format(figure.value), interval)


def numeric_outputs(cases: list[CaseRead]) -> list[str]:
    """Top-level numeric output fields, most common first."""
    seen: Counter[str] = Counter()
    for case in cases:
        for key, value in (case.output or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                seen[key] += 1
    return [key for key, _ in seen.most_common()]


def interval_metrics(report: AggregateRead) -> list[str]:
    """Figures that carry a confidence interval in at least one shown group."""
    keys = [c.key for c in report.columns]
    return [k for k in keys if any(
        (f := g.figures.get(k)) is not None and not f.suppressed and f.value is not None
        and f.ci_low is not None and f.ci_high is not None for g in report.groups.values())]


def forest_rows(report: AggregateRead, metric: str) -> list[plots.Estimate]:
    rows = []
    for name, group in report.groups.items():
        figure = group.figures.get(metric)
        if (figure is None or figure.suppressed or figure.value is None
                or figure.ci_low is None or figure.ci_high is None):
            continue
        rows.append(plots.Estimate(name, float(figure.value), figure.ci_low, figure.ci_high,
                                   figure.n))
    rows.sort(key=lambda r: r.label == POOLED)  # pooled last
    return rows


def roc_curves(report: AggregateRead) -> tuple[dict[str, list[tuple[float, float]]],
                                               dict[str, float | None]]:
    curves: dict[str, list[tuple[float, float]]] = {}
    areas: dict[str, float | None] = {}
    for name, group in report.groups.items():
        if group.roc is None or group.roc.suppressed or not group.roc.points:
            continue
        curves[name] = [(p.fpr, p.tpr) for p in group.roc.points]
        auc = group.figures.get("auc")
        areas[name] = None if auc is None or auc.suppressed or auc.value is None \
            else float(auc.value)
    return curves, areas


def results_view(experiment: ExperimentRead, report: AggregateRead, cases: list[CaseRead],
                 quantity: str | None = None, metric: str | None = None) -> ResultsView:
    columns = [label for _, label in COUNT_COLUMNS] + [c.label for c in report.columns]
    rows = [(name, [Cell(str(getattr(group, key))) for key, _ in COUNT_COLUMNS]
             + [cell(group.figures.get(c.key)) for c in report.columns])
            for name, group in report.groups.items()]
    k = report.min_cell_size
    shown = {name for name, group in report.groups.items() if group.succeeded >= k}
    visible_cases = [c for c in cases if c.spoke_id in shown]
    quantities = numeric_outputs(visible_cases)
    if quantity not in quantities:
        quantity = quantities[0] if quantities else None
    metrics = interval_metrics(report)
    if metric not in metrics:
        metric = next((m for m in ("sensitivity", "auc", "f1") if m in metrics),
                      metrics[0] if metrics else None)
    view = ResultsView(columns, rows, report, quantities, quantity, metrics, metric)
    methods = {(f.confidence, f.ci_method) for g in report.groups.values()
               for f in g.figures.values() if f.ci_method and f.confidence}
    view.intervals = ", ".join(f"{level:.0%} {method}" for level, method in sorted(methods))
    # Figures drawn once per snapshot (experiment, version, k) and the data they show (a
    # digest: a running study's outputs and a report built in a test change within one).
    snapshot = (report.experiment_id, report.version, report.min_cell_size)
    progress = tuple(plots.SpokeProgress(t.spoke_id, t.succeeded, t.failed, t.running,
                                         t.queued, t.case_count) for t in experiment.targets)
    view.figures["Progress per spoke"] = plots.CACHE.get(
        ("progress", progress), lambda: plots.progress_bars(list(progress)))
    if quantity is not None:
        values: dict[str, list[float]] = {}
        for case in visible_cases:
            value = (case.output or {}).get(quantity)
            if case.state == "succeeded" and isinstance(value, int | float):
                values.setdefault(case.spoke_id, []).append(float(value))
        view.figures[f"Distribution of {quantity}"] = plots.CACHE.get(
            ("distribution", snapshot, quantity, plots.fingerprint(values)),
            lambda: plots.distribution(values, quantity))
    curves, areas = roc_curves(report)
    if curves:
        view.figures["ROC curves"] = plots.CACHE.get(
            ("roc", snapshot, plots.fingerprint((curves, areas))),
            lambda: plots.roc_curves(curves, areas))
    if metric is not None:
        label = next(c.label for c in report.columns if c.key == metric)
        rows_ = forest_rows(report, metric)
        levels = {f.confidence for g in report.groups.values()
                  if (f := g.figures.get(metric)) is not None and f.confidence}
        if rows_ and not all(math.isnan(r.value) for r in rows_):
            confidence = levels.pop() if len(levels) == 1 else 0.95
            view.figures[f"{label} per spoke"] = plots.CACHE.get(
                ("forest", snapshot, metric, plots.fingerprint((rows_, label, confidence))),
                lambda: plots.forest(rows_, label, confidence=confidence))
    return view
