"""What the results section of an experiment's page shows: the aggregate report (``GET
/api/experiments/{id}/aggregate``, already small-cell suppressed by the aggregation engine)
as a table, and plain data for the plots in :mod:`tributary.hub.services.plots`.

A study of many spokes (more than :data:`MANY_SPOKES`) gets a compact summary instead of
per-spoke plots inline: the pooled figures first, one forest plot of every spoke (one image,
loaded by its own URL), the spoke table a page at a time and sortable; each spoke's own plots
are on its page (:func:`spoke_view`). Figures are drawn once per aggregate snapshot.

Suppressed figures are never plotted: a group whose ROC curve or forest-plot figure is
suppressed is left out of that plot, and a spoke with fewer finished cases than the
suppression threshold k is left out of the distribution of outputs."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

from tributary.hub.aggregation.report import POOLED, AggregateRead, Figure, GroupReport
from tributary.hub.schemas import CaseRead, ExperimentRead
from tributary.hub.services import plots
from tributary.hub.services.progress import OutputRead

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
    images: dict[str, str] = field(default_factory=dict)  # title -> URL of an SVG
    compact: bool = False  # many spokes: summary first, spokes a page at a time
    pooled: list[Cell] | None = None  # the pooled row, shown first in the compact layout
    spokes: int = 0  # spokes in the table (all pages)
    page: int = 1
    pages: int = 1
    sort: str = "group"
    desc: bool = False
    sorts: list[tuple[str, str]] = field(default_factory=list)  # (key, heading)


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


def numeric_outputs(cases: Sequence[Case]) -> list[str]:
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


#: Above this many spokes the results section is a compact summary (see module doc).
MANY_SPOKES = 12
SPOKES_PER_PAGE = 25

Case = CaseRead | OutputRead
Outputs = Sequence[Case] | Callable[[], Sequence[Case]]


def _quantities(snapshot: tuple[object, ...], outputs: Callable[[], Sequence[Case]],
                shown: set[str]) -> list[str]:
    """The numeric output fields of the shown spokes, kept per snapshot (in the plot
    cache) so a page reads no case output once they are known."""
    key = ("quantities", snapshot, tuple(sorted(shown)))
    text = plots.CACHE.get(key, lambda: "\n".join(numeric_outputs(
        [c for c in outputs() if c.spoke_id in shown])))
    return [q for q in text.split("\n") if q]


def _memo(outputs: Outputs) -> Callable[[], Sequence[Case]]:
    """The outputs, read from the database at most once and only if a figure needs them."""
    if not callable(outputs):
        return lambda: outputs
    box: list[Sequence[Case]] = []

    def read() -> Sequence[Case]:
        if not box:
            box.append(outputs())
        return box[0]
    return read


def _sort_value(cells: dict[str, Figure | int | None], key: str) -> tuple[int, float]:
    value = cells.get(key)
    if isinstance(value, Figure):
        value = None if value.suppressed else value.value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (1, 0.0)  # unknown or suppressed: always last
    return (0, float(value))


def _snapshot(report: AggregateRead) -> tuple[object, ...]:
    return (report.experiment_id, report.version, report.min_cell_size, report.computed_at)


def results_view(experiment: ExperimentRead, report: AggregateRead, cases: Outputs,
                 quantity: str | None = None, metric: str | None = None,
                 sort: str | None = None, desc: bool = False, page: int = 1) -> ResultsView:
    """The results section. ``cases`` are the succeeded cases' outputs (or a function that
    reads them: it is called only when a figure of this snapshot is not drawn yet)."""
    outputs = _memo(cases)
    names = [name for name in report.groups if name != POOLED]
    compact = len(names) > MANY_SPOKES
    columns = [label for _, label in COUNT_COLUMNS] + [c.label for c in report.columns]

    def row(group: GroupReport) -> list[Cell]:
        return ([Cell(str(getattr(group, key))) for key, _ in COUNT_COLUMNS]
                + [cell(group.figures.get(c.key)) for c in report.columns])

    k = report.min_cell_size
    shown = {name for name, group in report.groups.items() if group.succeeded >= k}
    snapshot = _snapshot(report)
    # Many spokes: the distribution of outputs is on each spoke's page, none is read here.
    quantities = [] if compact else _quantities(snapshot, outputs, shown - {POOLED})
    if quantity not in quantities:
        quantity = quantities[0] if quantities else None
    metrics = interval_metrics(report)
    if metric not in metrics:
        metric = next((m for m in ("sensitivity", "auc", "f1") if m in metrics),
                      metrics[0] if metrics else None)
    if not compact:
        rows = [(name, row(group)) for name, group in report.groups.items()]
        view = ResultsView(columns, rows, report, quantities, quantity, metrics, metric)
    else:
        sorts = [("group", "Spoke"), *COUNT_COLUMNS, *((c.key, c.label) for c in report.columns)]
        if sort not in {key for key, _ in sorts}:
            sort = "group"
        groups = [report.groups[name] for name in names]
        if sort == "group":
            groups.sort(key=lambda g: g.group, reverse=desc)
        else:
            def value(g: GroupReport) -> tuple[int, float]:
                cells: dict[str, Figure | int | None] = {
                    **{key: getattr(g, key) for key, _ in COUNT_COLUMNS}, **g.figures}
                flag, number = _sort_value(cells, sort or "")
                return (flag, -number if desc else number)
            groups.sort(key=value)
        pages = max(1, math.ceil(len(groups) / SPOKES_PER_PAGE))
        page = min(max(1, page), pages)
        chosen = groups[(page - 1) * SPOKES_PER_PAGE:page * SPOKES_PER_PAGE]
        view = ResultsView(columns, [(g.group, row(g)) for g in chosen], report, quantities,
                           quantity, metrics, metric, compact=True, spokes=len(groups),
                           page=page, pages=pages, sort=sort, desc=desc, sorts=sorts)
        if POOLED in report.groups:
            view.pooled = row(report.groups[POOLED])
    methods = {(f.confidence, f.ci_method) for g in report.groups.values()
               for f in g.figures.values() if f.ci_method and f.confidence}
    view.intervals = ", ".join(f"{level:.0%} {method}" for level, method in sorted(methods))
    if compact:
        _compact_figures(view, report, metric)
        return view
    # Figures drawn once per snapshot (experiment, version, k); progress once per counts.
    progress = tuple(plots.SpokeProgress(t.spoke_id, t.succeeded, t.failed, t.running,
                                         t.queued, t.case_count) for t in experiment.targets)
    view.figures["Progress per spoke"] = plots.CACHE.get(
        ("progress", progress), lambda: plots.progress_bars(list(progress)))
    if quantity is not None:
        view.figures[f"Distribution of {quantity}"] = plots.CACHE.get(
            ("distribution", snapshot, quantity, tuple(sorted(shown))),
            lambda: plots.distribution(_values(outputs(), quantity, shown), quantity))
    curves, areas = roc_curves(report)
    if curves:
        view.figures["ROC curves"] = plots.CACHE.get(
            ("roc", snapshot), lambda: plots.roc_curves(curves, areas))
    if metric is not None:
        label = next(c.label for c in report.columns if c.key == metric)
        rows_ = forest_rows(report, metric)
        if rows_ and not all(math.isnan(r.value) for r in rows_):
            view.figures[f"{label} per spoke"] = plots.CACHE.get(
                ("forest", snapshot, metric),
                lambda: plots.forest(rows_, label, confidence=_confidence(report, metric)))
    return view


def _values(cases: Sequence[Case], quantity: str, shown: set[str]
            ) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for case in cases:
        value = (case.output or {}).get(quantity)
        if (case.spoke_id in shown and case.state == "succeeded"
                and isinstance(value, int | float) and not isinstance(value, bool)):
            values.setdefault(case.spoke_id, []).append(float(value))
    return values


def _confidence(report: AggregateRead, metric: str) -> float:
    levels = {f.confidence for g in report.groups.values()
              if (f := g.figures.get(metric)) is not None and f.confidence}
    return levels.pop() if len(levels) == 1 else 0.95


def _compact_figures(view: ResultsView, report: AggregateRead, metric: str | None) -> None:
    """Many spokes: the pooled ROC curve inline, and the forest plot of every spoke as an
    image of its own URL (versioned by snapshot, so a browser keeps it until it changes)."""
    curves, areas = roc_curves(report)
    if POOLED in curves:
        view.figures["Pooled ROC curve"] = plots.CACHE.get(
            ("roc-pooled", _snapshot(report)),
            lambda: plots.roc_curves({POOLED: curves[POOLED]}, {POOLED: areas.get(POOLED)}))
    if metric is not None and forest_rows(report, metric):
        label = next(c.label for c in report.columns if c.key == metric)
        view.images[f"{label} per spoke"] = (
            f"/experiments/{quote(report.experiment_id)}/plots/forest.svg?"
            f"{urlencode({'metric': metric, 'v': report.version})}")


def forest_svg(report: AggregateRead, metric: str) -> str | None:
    """Every spoke's estimate of ``metric`` in one forest plot, sorted by estimate (outliers
    at either end), pooled last; None if the metric has no interval to show."""
    rows = forest_rows(report, metric)
    if not rows or metric not in {c.key for c in report.columns}:
        return None
    label = next(c.label for c in report.columns if c.key == metric)
    spokes = sorted((r for r in rows if r.label != POOLED),
                    key=lambda r: (math.isnan(r.value), r.value))
    ordered = spokes + [r for r in rows if r.label == POOLED]
    return plots.CACHE.get(("forest-all", _snapshot(report), metric),
                           lambda: plots.forest_many(ordered, label,
                                                     confidence=_confidence(report, metric)))


@dataclass
class SpokeView:
    """One spoke's detail: its row of figures, failures and its own plots."""

    spoke: str
    columns: list[str]
    cells: list[Cell]
    pooled: list[Cell] | None
    failure_reasons: dict[str, int]
    quantities: list[str]
    quantity: str | None
    figures: dict[str, str] = field(default_factory=dict)


def spoke_view(report: AggregateRead, spoke: str, cases: Outputs,
               quantity: str | None = None) -> SpokeView | None:
    """The detail of one spoke, drawn once per snapshot; None if it is not in the report.
    ``cases`` are that spoke's succeeded outputs (read only if a figure needs drawing)."""
    group = report.groups.get(spoke)
    if group is None or spoke == POOLED:
        return None
    outputs = _memo(cases)
    columns = [label for _, label in COUNT_COLUMNS] + [c.label for c in report.columns]

    def row(g: GroupReport) -> list[Cell]:
        return ([Cell(str(getattr(g, key))) for key, _ in COUNT_COLUMNS]
                + [cell(g.figures.get(c.key)) for c in report.columns])

    pooled = report.groups.get(POOLED)
    snapshot = _snapshot(report)
    visible = group.succeeded >= report.min_cell_size
    quantities = (_quantities((*snapshot, spoke), outputs, {spoke})
                  if visible else [])
    if quantity not in quantities:
        quantity = quantities[0] if quantities else None
    view = SpokeView(spoke, columns, row(group), row(pooled) if pooled else None,
                     dict(group.failure_reasons), quantities, quantity)
    if quantity is not None:
        view.figures[f"Distribution of {quantity}"] = plots.CACHE.get(
            ("distribution", snapshot, quantity, spoke),
            lambda: plots.distribution(_values(outputs(), quantity, {spoke}), quantity))
    curves, areas = roc_curves(report)
    mine = {name: curves[name] for name in (spoke, POOLED) if name in curves}
    if spoke in mine:
        view.figures["ROC curve"] = plots.CACHE.get(
            ("roc-spoke", snapshot, spoke), lambda: plots.roc_curves(mine, areas))
    return view
