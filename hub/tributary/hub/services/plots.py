"""Plots of an experiment, rendered on the hub as SVG so pages need no script library and
no outside host. Each function takes plain data (numbers and labels), never database rows,
so the figures can come from any source: the aggregate report, a CSV, a test.

matplotlib draws them through its object API and SVG backend (no pyplot, so no global
state shared between a web server's threads); text stays text (``svg.fonttype = none``) so the
browser's font is used and the figures remain searchable and accessible."""

from __future__ import annotations

import hashlib
import html
import io
import itertools
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib import rcParams
from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

rcParams["svg.fonttype"] = "none"
rcParams["svg.hashsalt"] = "tributary"  # deterministic ids: same data, same SVG
rcParams["font.size"] = 9

#: State colours, shared with the stylesheet (hub/static/dashboard.css).
COLOURS = {"succeeded": "#2e8b57", "failed": "#c8423b", "running": "#d9921e",
           "queued": "#9aa5b4", "pooled": "#1d2430"}
PALETTE = ["#2458b3", "#b35a24", "#2e8b57", "#7a3fb3", "#b3245f", "#3f8fb3", "#8a7a1d"]


@dataclass(frozen=True)
class SpokeProgress:
    spoke: str
    succeeded: int
    failed: int
    running: int
    queued: int
    total: int | None  # unknown until the spoke has selected its cases


@dataclass(frozen=True)
class Estimate:
    """One row of a forest plot: a point estimate with its confidence interval."""

    label: str
    value: float
    low: float
    high: float
    n: int | None = None


def _svg(figure: Figure, title: str) -> str:
    """The figure as an inline ``<svg>`` element with an accessible title."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    safe = html.escape(title, quote=True)  # titles may hold output field names
    # role/aria for screen readers; width 100% so the figure follows the layout. Plain
    # string splicing: the title is data (an output field name), never a regex template.
    text = text.replace("<svg ", f'<svg role="img" aria-label="{safe}" class="plot" ', 1)
    end = text.index(">") + 1
    return f"{text[:end]}<title>{safe}</title>{text[end:]}"


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    figure.patch.set_alpha(0)
    return figure


def _tidy(axes: object) -> None:
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)  # type: ignore[attr-defined]


def progress_bars(rows: Sequence[SpokeProgress]) -> str:
    """One horizontal stacked bar per spoke: done, failed, running, queued of its cases."""
    figure = _figure(5.2, 0.4 * max(len(rows), 1) + 0.9)
    axes = figure.subplots()
    labels = [r.spoke for r in rows]
    left = [0.0] * len(rows)
    for state in ("succeeded", "failed", "running", "queued"):
        values = [float(getattr(r, state)) for r in rows]
        axes.barh(labels, values, left=left, color=COLOURS[state], label=state, height=0.6)
        left = [a + b for a, b in zip(left, values, strict=True)]
    for index, row in enumerate(rows):
        total = "?" if row.total is None else str(row.total)
        axes.text(max(left[index], 0) + 0.1, index,
                  f" {row.succeeded + row.failed}/{total}", va="center")
    axes.invert_yaxis()
    axes.set_xlabel("cases")
    axes.set_xlim(0, max([*left, *(r.total or 0 for r in rows), 1]) * 1.15)
    axes.legend(ncols=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    _tidy(axes)
    return _svg(figure, "Progress per spoke: cases done, failed, running and queued")


def distribution(values: Mapping[str, Sequence[float]], quantity: str) -> str:
    """Distribution of one numeric output per spoke (box plot with the points over it)."""
    groups = {k: list(v) for k, v in values.items() if v}
    figure = _figure(5.2, 0.45 * max(len(groups), 1) + 1.0)
    axes = figure.subplots()
    if groups:
        labels = list(groups)
        axes.boxplot(list(groups.values()), orientation="horizontal", tick_labels=labels,
                     widths=0.5, showfliers=False, medianprops={"color": COLOURS["pooled"]})
        for index, points in enumerate(groups.values(), start=1):
            jitter = [index + ((i * 37) % 11 - 5) * 0.025 for i in range(len(points))]
            axes.scatter(points, jitter, s=12, alpha=0.6,
                         color=PALETTE[(index - 1) % len(PALETTE)], zorder=3)
        axes.invert_yaxis()
    else:
        axes.text(0.5, 0.5, "no results yet", ha="center", va="center",
                  transform=axes.transAxes)
        axes.set_yticks([])
    axes.set_xlabel(quantity)
    _tidy(axes)
    return _svg(figure, f"Distribution of {quantity} per spoke")


def roc_curves(curves: Mapping[str, Sequence[tuple[float, float]]],
               auc: Mapping[str, float | None] | None = None) -> str:
    """ROC curves (false-positive rate, true-positive rate) per spoke and pooled."""
    figure = _figure(4.0, 3.8)
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], color="#c3c9d3", linestyle="--", linewidth=1)
    colour = itertools.cycle(PALETTE)  # any number of spokes (200 is not unusual)
    for name, points in curves.items():
        if not points:
            continue
        ordered = sorted(points)
        area = (auc or {}).get(name)
        label = f"{name} (AUC {area:.2f})" if area is not None else name
        pooled = name == "pooled"
        axes.plot([p[0] for p in ordered], [p[1] for p in ordered],
                  color=COLOURS["pooled"] if pooled else next(colour),
                  linewidth=2.4 if pooled else 1.4, label=label)
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.set_aspect("equal")
    axes.set_xlabel("false-positive rate (1 - specificity)")
    axes.set_ylabel("true-positive rate (sensitivity)")
    axes.legend(loc="lower right", fontsize=8, frameon=False)
    _tidy(axes)
    return _svg(figure, "ROC curves per spoke and pooled")


def forest(rows: Sequence[Estimate], metric: str, reference: float | None = None,
           confidence: float = 0.95) -> str:
    """A forest plot: each spoke's estimate with its confidence interval, pooled last."""
    figure = _figure(3.6, 0.4 * max(len(rows), 1) + 0.9)
    axes = figure.subplots()
    for index, row in enumerate(rows):
        pooled = row.label == "pooled"
        colour = COLOURS["pooled"] if pooled else PALETTE[0]
        axes.plot([row.low, row.high], [index, index], color=colour, linewidth=1.6)
        axes.plot([row.value], [index], marker="D" if pooled else "s",
                  markersize=8 if pooled else 6, color=colour)
        n = f", n={row.n}" if row.n is not None else ""
        axes.text(1.04, index, f"{row.value:.2f} [{row.low:.2f}, {row.high:.2f}]{n}",
                  va="center", transform=axes.get_yaxis_transform())
    axes.set_yticks(range(len(rows)), [r.label for r in rows])
    axes.invert_yaxis()
    if reference is not None:
        axes.axvline(reference, color="#c3c9d3", linestyle="--", linewidth=1)
    if rows and min(r.low for r in rows) >= 0 and max(r.high for r in rows) <= 1:
        axes.set_xlim(-0.02, 1.02)  # a proportion: show its whole range
    axes.set_xlabel(f"{metric} ({confidence:.0%} confidence interval)")
    _tidy(axes)
    return _svg(figure, f"Forest plot of {metric} per spoke with {confidence:.0%} confidence "
                        "intervals")


@dataclass(frozen=True)
class RoundPoint:
    """One attempt of a training round, for the study's curves."""

    label: str  # "3" or "3.2" (round 3, second attempt)
    targeted: int
    joined: int
    survived: int
    epsilon: float | None  # cumulative, None when the attempt charged nothing
    loss: float | None = None
    metric: float | None = None


def training_curves(points: Sequence[RoundPoint], budget: float,
                    metric_name: str = "metric") -> str:
    """A training study per round attempt: loss and metric when reported, spokes targeted,
    joined and surviving the masking stage, and the cumulative epsilon against the budget
    (log scale when the budget is far above what was spent)."""
    panels = ["spokes", "epsilon"]
    if any(p.loss is not None or p.metric is not None for p in points):
        panels.insert(0, "loss")
    figure = _figure(5.6, 1.9 * len(panels) + 0.4)
    axes_list = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    xs = list(range(len(points)))
    labels = [p.label for p in points]
    for axes, panel in zip(axes_list, panels, strict=True):
        if panel == "loss":
            for name, colour, values in (("loss", PALETTE[1], [p.loss for p in points]),
                                         (metric_name, PALETTE[0], [p.metric for p in points])):
                pairs = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
                if pairs:
                    axes.plot([x for x, _ in pairs], [v for _, v in pairs], marker="o",
                              color=colour, label=name)
            axes.set_ylabel("loss / metric")
        elif panel == "spokes":
            for name, colour, values in (
                    ("targeted", COLOURS["queued"], [p.targeted for p in points]),
                    ("joined", COLOURS["running"], [p.joined for p in points]),
                    ("survived masking", COLOURS["succeeded"], [p.survived for p in points])):
                axes.plot(xs, values, marker="o", color=colour, label=name)
            top = max([p.targeted for p in points] + [1])
            axes.set_ylim(-0.2, top + 0.5)
            axes.yaxis.get_major_locator().set_params(integer=True)
            axes.set_ylabel("spokes")
        else:
            pairs = [(x, p.epsilon) for x, p in zip(xs, points, strict=True)
                     if p.epsilon is not None]
            if pairs:
                axes.plot([x for x, _ in pairs], [v for _, v in pairs], marker="o",
                          color=PALETTE[3], label="epsilon spent")
            axes.axhline(budget, color=COLOURS["failed"], linestyle="--", linewidth=1,
                         label=f"budget {budget:g}")
            spent = max([v for _, v in pairs] + [0.0])
            if spent > 0 and budget / spent > 100:
                axes.set_yscale("log")
            axes.set_ylabel("epsilon")
        axes.legend(ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False,
                    fontsize=8)
        _tidy(axes)
    axes_list[-1].set_xticks(xs, labels)
    axes_list[-1].set_xlabel("round (.attempt)")
    if not points:
        axes_list[-1].text(0.5, 0.5, "no round yet", ha="center", va="center",
                           transform=axes_list[-1].transAxes)
    return _svg(figure, "Training per round: " + ", ".join(
        {"loss": "loss and metric", "spokes": "spokes targeted, joined and surviving masking",
         "epsilon": "cumulative epsilon against the budget"}[p] for p in panels))


def loss_curve(losses: Sequence[float], title: str = "Training loss per round") -> str:
    """One loss per round (a vertical study's: the label spoke's, before each step)."""
    figure = _figure(5.6, 2.3)
    axes = figure.subplots()
    if losses:
        axes.plot(range(len(losses)), list(losses), marker="o", color=PALETTE[1],
                  label="loss")
    else:
        axes.text(0.5, 0.5, "no round yet", ha="center", va="center",
                  transform=axes.transAxes)
    axes.set_xlabel("round")
    axes.set_ylabel("loss")
    _tidy(axes)
    return _svg(figure, title)


def _ticks(low: float, high: float) -> list[float]:
    """About five round tick values covering [low, high]."""
    span = high - low or 1.0
    step = 10 ** math.floor(math.log10(span / 5))
    for factor in (1, 2, 2.5, 5, 10):
        if span / (step * factor) <= 6:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step) + 1)]


def forest_many(rows: Sequence[Estimate], metric: str, confidence: float = 0.95) -> str:
    """A forest plot of many rows (every spoke of a large study, pooled last), written as
    SVG directly: matplotlib takes most of a second of CPU for two hundred rows, and a
    running study's plot is redrawn with every snapshot. Same colours and reading as
    :func:`forest`: a square per estimate, its interval as a line, pooled as a diamond."""
    row_h, top, label_w, plot_w, text_w = 14, 10, 120, 330, 190
    width = label_w + plot_w + text_w
    height = top + row_h * max(len(rows), 1) + 44
    finite = [v for r in rows for v in (r.low, r.high, r.value) if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if finite and low >= 0 and high <= 1:
        low, high = 0.0, 1.0  # a proportion: its whole range
    if high == low:
        low, high = low - 0.5, high + 0.5

    def x(value: float) -> float:
        return label_w + (value - low) / (high - low) * plot_w

    title = html.escape(f"Forest plot of {metric} per spoke with {confidence:.0%} "
                        "confidence intervals", quote=True)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{title}" '
           f'class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="10">', f"<title>{title}</title>"]
    bottom = top + row_h * len(rows)
    for tick in _ticks(low, high):
        out.append(f'<line x1="{x(tick):.1f}" y1="{top}" x2="{x(tick):.1f}" y2="{bottom}" '
                   f'stroke="#e3e7ee"/><text x="{x(tick):.1f}" y="{bottom + 14}" '
                   f'text-anchor="middle">{tick:g}</text>')
    for index, row in enumerate(rows):
        y = top + row_h * index + row_h / 2
        pooled = row.label == "pooled"
        colour = COLOURS["pooled"] if pooled else PALETTE[0]
        label = html.escape(row.label)
        weight = ' font-weight="bold"' if pooled else ""
        out.append(f'<text x="{label_w - 6}" y="{y + 3.5:.1f}" text-anchor="end"{weight}>'
                   f"{label}</text>")
        if math.isfinite(row.low) and math.isfinite(row.high):
            out.append(f'<line x1="{x(row.low):.1f}" y1="{y:.1f}" x2="{x(row.high):.1f}" '
                       f'y2="{y:.1f}" stroke="{colour}" stroke-width="1.6"/>')
        if math.isfinite(row.value):
            cx = x(row.value)
            if pooled:
                out.append(f'<polygon points="{cx - 6:.1f},{y:.1f} {cx:.1f},{y - 5:.1f} '
                           f'{cx + 6:.1f},{y:.1f} {cx:.1f},{y + 5:.1f}" fill="{colour}"/>')
            else:
                out.append(f'<rect x="{cx - 3:.1f}" y="{y - 3:.1f}" width="6" height="6" '
                           f'fill="{colour}"/>')
        n = f", n={row.n}" if row.n is not None else ""
        out.append(f'<text x="{label_w + plot_w + 8}" y="{y + 3.5:.1f}">{row.value:.2f} '
                   f'[{row.low:.2f}, {row.high:.2f}]{n}</text>')
    out.append(f'<line x1="{label_w}" y1="{bottom}" x2="{label_w + plot_w}" y2="{bottom}" '
               f'stroke="#1d2430"/><text x="{label_w + plot_w / 2}" y="{bottom + 32}" '
               f'text-anchor="middle">{html.escape(metric)} ({confidence:.0%} confidence '
               f"interval)</text></svg>")
    return "".join(out)


def fingerprint(data: object) -> str:
    """A short digest of a figure's plain data (numbers, labels), for cache keys."""
    return hashlib.sha256(repr(data).encode()).hexdigest()


class PlotCache:
    """Drawn figures kept per aggregate snapshot (``key`` names the snapshot and what else
    the figure depends on), so a page does not redraw them per request: a snapshot never
    changes once stored. Bounded, least recently used first out; safe across threads. A
    figure is drawn once however many requests want it at the same moment (a hundred
    viewers re-reading the results when a snapshot lands): the others wait for it. With
    ``ttl``, an entry is drawn again once older than ``ttl`` seconds."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._figures: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._drawing: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def _fresh(self, key: Hashable, ttl: float | None) -> tuple[bool, Any]:
        with self._lock:
            entry = self._figures.get(key)
            if entry is None or (ttl is not None and time.monotonic() - entry[0] > ttl):
                return False, None
            self._figures.move_to_end(key)
            return True, entry[1]

    def get(self, key: Hashable, draw: Callable[[], Any], ttl: float | None = None) -> Any:
        found, value = self._fresh(key, ttl)
        if found:
            return value
        with self._lock:
            drawing = self._drawing.setdefault(key, threading.Lock())
        with drawing:  # one drawer per key; the others find its figure afterwards
            found, value = self._fresh(key, ttl)
            if not found:
                value = draw()
                with self._lock:
                    self._figures[key] = (time.monotonic(), value)
                    self._figures.move_to_end(key)
                    while len(self._figures) > self.size:
                        self._figures.popitem(last=False)
            with self._lock:
                self._drawing.pop(key, None)
        return value

    def __len__(self) -> int:
        return len(self._figures)


#: The hub process's figures, keyed by snapshot (see web/results.py).
CACHE = PlotCache()
