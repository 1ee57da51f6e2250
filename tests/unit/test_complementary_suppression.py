"""Suppressed figures cannot be recovered by subtraction (issue 10, item 12): a group
withheld for having fewer than k cases must not come back as pooled minus the other groups,
and its n (itself a count below k) is shown nowhere: not in the report the API and pages
read, not in the CSV export, not in ``tributary study show``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tributary.hub.aggregation import CaseView, get_aggregator, run
from tributary.hub.aggregation.report import AggregateRead, Figure, GroupReport
from tributary.hub.models import CaseState
from tributary.hub.services.exports import aggregate_csv

K = 5


def scored(spoke: str, scores: list[float], labels: list[int]) -> list[CaseView]:
    return [CaseView(spoke, f"c-{spoke}-{i}", CaseState.SUCCEEDED, {"p": s, "size": 10.0 + i},
                     {"diagnosis": y}, None)
            for i, (s, y) in enumerate(zip(scores, labels, strict=True))]


def cohort() -> list[CaseView]:
    big = scored("big", [0.9, 0.8, 0.3, 0.7, 0.6, 0.2, 0.1, 0.4, 0.35, 0.05, 0.95, 0.15],
                 [1, 1, 0, 1, 1, 0, 0, 0, 1, 0, 1, 0])
    mid = scored("mid", [0.9, 0.2, 0.7, 0.3, 0.8, 0.1, 0.6, 0.4, 0.65, 0.45],
                 [1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    small = scored("small", [0.9, 0.1, 0.8], [1, 0, 1])
    return big + mid + small


def total(figure: Figure, proportion: bool) -> float | None:
    """What a figure says about its cases' sum: value times n for a mean or proportion."""
    if figure.value is None or figure.n is None:
        return None
    return figure.value * figure.n if proportion else figure.value


def recovered(groups: dict[str, GroupReport], key: str, target: str,
              proportion: bool) -> float | None:
    """The attack: pooled minus every other group."""
    pooled = total(groups["pooled"].figures[key], proportion)
    others = [total(g.figures[key], proportion) for name, g in groups.items()
              if name not in ("pooled", target)]
    if pooled is None or any(o is None for o in others):
        return None
    return pooled - sum(others)  # type: ignore[arg-type]


def test_a_suppressed_group_cannot_be_recovered_by_subtraction() -> None:
    for aggregator, keys in (
            (get_aggregator("binary-classification", {"score": "p", "label": "diagnosis"}),
             {"true_positives": False, "positives": False, "sensitivity": True,
              "specificity": True}),
            (get_aggregator("summary", {}), {"size.mean": True, "size.n": False})):
        groups = run(aggregator, ["big", "mid", "small"], cohort(), min_cell_size=K).groups
        for key, proportion in keys.items():
            small = groups["small"].figures[key]
            assert small.value is None and small.suppressed, key
            assert recovered(groups, key, "small", proportion) is None, \
                f"{key} of the small group recovered by subtraction"
            assert small.n is None, f"{key}: n of a suppressed figure is shown"
            shown = [g.figures[key] for g in groups.values() if g.figures[key].value is not None]
            assert shown, f"{key}: everything suppressed, the complement went too far"
            assert all(f.n is None or f.n >= K or f.n == 0 for g in groups.values()
                       for f in g.figures.values()), "an n below k is shown"


def test_exports_and_the_terminal_table_show_no_n_below_k() -> None:
    from tributary.cli.results_table import aggregate_table

    aggregator = get_aggregator("binary-classification", {"score": "p", "label": "diagnosis"})
    result = run(aggregator, ["big", "mid", "small"], cohort(), min_cell_size=K)
    report = AggregateRead(experiment_id="exp-1", aggregator="binary-classification",
                           parameters={}, version=1, computed_at=datetime.now(UTC),
                           results=25, min_cell_size=K, columns=result.columns,
                           groups=result.groups)
    csv_rows = [line.split(",") for line in aggregate_csv(report).splitlines()[1:]]
    for group, figure, value, n, *rest, _as_of, _covered in csv_rows:
        if figure in ("cases", "succeeded", "failed", "pending"):
            continue  # progress counts, shown to every coordinator
        assert not (n and 0 < int(n) < K), (group, figure, n)
        if rest[-1]:  # suppressed: neither value nor n
            assert value == "" and n == "", (group, figure)
    rendered: Any = aggregate_table(report.model_dump(mode="json"))
    small = next(c for c in rendered.columns if c.header == "small")
    assert "suppressed" in list(small.cells)


def test_suppressing_a_suppressed_table_again_changes_nothing() -> None:
    """Stored snapshots are suppressed again when read: that must be a no-op."""
    from tributary.hub.aggregation.suppression import suppress_table

    aggregator = get_aggregator("binary-classification", {"score": "p", "label": "diagnosis"})
    groups = run(aggregator, ["big", "mid", "small"], cohort(), min_cell_size=K).groups
    assert suppress_table(groups, "pooled", K) == groups
