"""An aggregate report as a terminal table: figures as rows, spokes and the pooled group as
columns (so it fits a terminal), each figure with its confidence interval. Shared by
``tributary demo`` and ``tributary study show``; the report is the hub's
``GET /api/experiments/{id}/aggregate`` JSON."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

COUNTS = (("cases", "Cases"), ("succeeded", "Done"), ("failed", "Failed"))


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def figure_cell(figure: dict[str, Any] | None) -> str:
    """``0.93 [0.82, 0.98]``; ``suppressed`` for a figure over fewer than k cases."""
    if not figure:
        return "-"
    if figure.get("suppressed"):
        return "suppressed"
    text = _number(figure.get("value"))
    if figure.get("ci_low") is not None and figure.get("ci_high") is not None:
        text += f" [{_number(figure['ci_low'])}, {_number(figure['ci_high'])}]"
    return text


def aggregate_table(report: dict[str, Any]) -> Table:
    groups = report["groups"]
    levels = {f["confidence"] for g in groups.values() for f in g["figures"].values()
              if f.get("confidence")}
    caption = (rf"value \[{', '.join(f'{c:.0%}' for c in sorted(levels))} confidence "
               "interval]" if levels else None)
    if any(f.get("suppressed") for g in groups.values() for f in g["figures"].values()):
        k = report.get("min_cell_size")
        suppressed = f"suppressed: computed over fewer than {k} cases" if k else "suppressed"
        caption = f"{caption}; {suppressed}" if caption else suppressed
    table = Table(title=f"Aggregated results ({escape(report['aggregator'])})", caption=caption)
    table.add_column("figure", style="bold", no_wrap=True)
    for group in groups:
        table.add_column(escape(group), justify="right",
                         style="bold" if group == "pooled" else None)
    for key, label in COUNTS:
        table.add_row(escape(label), *(escape(_number(group[key])) for group in groups.values()))
    for column in report["columns"]:
        table.add_row(escape(column["label"]),  # the algorithm named it: data, not markup
                      *(escape(figure_cell(group["figures"].get(column["key"])))
                        for group in groups.values()))
    return table
