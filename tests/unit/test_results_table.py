"""The terminal table of an aggregate report (`tributary study show`, the demo): every
figure with its interval, suppressed cells named as such, the caption saying why."""

from __future__ import annotations

from io import StringIO

from rich.console import Console

from tributary.cli.results_table import aggregate_table, figure_cell


def _figure(value: float | None, low: float | None = None, high: float | None = None,
            suppressed: str | None = None) -> dict:
    return {"value": value, "n": 12, "ci_low": low, "ci_high": high,
            "ci_method": "wilson" if low is not None else None,
            "confidence": 0.95 if low is not None else None, "suppressed": suppressed}


def test_a_figure_shows_its_interval_or_why_it_is_hidden() -> None:
    assert figure_cell(_figure(0.9333, 0.8167, 0.9812)) == "0.933 [0.817, 0.981]"
    assert figure_cell(_figure(7)) == "7"
    assert figure_cell(_figure(None, suppressed="fewer than 5 cases")) == "suppressed"
    assert figure_cell(None) == "-"


def test_the_table_has_a_row_per_figure_and_a_column_per_group() -> None:
    group = {"cases": 12, "succeeded": 11, "failed": 1}
    report = {"aggregator": "binary-classification", "min_cell_size": 5,
              "columns": [{"key": "sensitivity", "label": "Sensitivity"}],
              "groups": {"north": {**group, "figures": {"sensitivity": _figure(
                             None, suppressed="fewer than 5 cases")}},
                         "pooled": {**group, "figures": {"sensitivity": _figure(
                             0.8, 0.6, 0.9)}}}}
    out = StringIO()
    Console(file=out, width=120).print(aggregate_table(report))
    text = out.getvalue()
    rows = {line.strip("│ ").split(" ")[0]: line for line in text.splitlines()}
    caption = " ".join(text.split("┘")[1].split())  # rich wraps it to the table's width
    assert "suppressed" in rows["Sensitivity"] and "0.8 [0.6, 0.9]" in rows["Sensitivity"]
    assert [c.strip() for c in rows["Failed"].split("│")[2:4]] == ["1", "1"]
    assert caption == ("value [95% confidence interval]; suppressed: computed over fewer "
                       "than 5 cases")
