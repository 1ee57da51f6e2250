"""Runs an aggregator over an experiment's cases: one group per targeted spoke and one
pooled group, suppressed against k as one table (primary and complementary). Pure: no
database, so it is tested on plain inputs and gives the same figures wherever it runs (hub
process or Celery worker)."""

from __future__ import annotations

from dataclasses import dataclass

from tributary.hub.aggregation.base import Aggregator, CaseView
from tributary.hub.aggregation.partial import total
from tributary.hub.aggregation.report import POOLED, Column, Figure, GroupReport
from tributary.hub.aggregation.suppression import suppress_table
from tributary.hub.models import CaseState


@dataclass(frozen=True)
class Aggregate:
    columns: list[Column]
    groups: dict[str, GroupReport]


def group(aggregator: Aggregator, name: str, cases: list[CaseView], pooled: bool
          ) -> tuple[GroupReport, dict[str, Figure]]:
    """One group, NOT suppressed, and those of its figures that need every value (all of
    them unless the aggregator is incremental; the rest follow from running sums)."""
    if aggregator.incremental:
        from_full = aggregator.full_figures(cases)
        sums = total(aggregator.contribution(c) for c in cases
                     if c.state == CaseState.SUCCEEDED)
        figures = aggregator.merge(aggregator.sum_figures(sums), from_full)
    else:
        figures = from_full = aggregator.figures(cases)
    report = aggregator.counts(name, cases, pooled).model_copy(
        update={"figures": figures, "roc": aggregator.roc(cases)})
    return report, from_full


def groups(aggregator: Aggregator, spokes: list[str], cases: list[CaseView]
           ) -> list[tuple[GroupReport, dict[str, Figure]]]:
    """:func:`group` of each targeted spoke (sorted), then of all cases pooled."""
    by_spoke: dict[str, list[CaseView]] = {spoke: [] for spoke in spokes}
    for case in cases:
        if case.spoke_id in by_spoke:
            by_spoke[case.spoke_id].append(case)
    raw = [group(aggregator, spoke, by_spoke[spoke], pooled=False) for spoke in sorted(spokes)]
    raw.append(group(aggregator, POOLED, cases, pooled=True))
    return raw


def assemble(aggregator: Aggregator, raw: list[GroupReport], min_cell_size: int) -> Aggregate:
    """Columns and the suppressed table of groups computed by :func:`groups` (or merged
    from running sums and a full pass)."""
    if min_cell_size < 1:
        raise ValueError("the minimum cell size k must be at least 1")
    return Aggregate(columns=aggregator.columns(raw),
                     groups=suppress_table({g.group: g for g in raw}, POOLED, min_cell_size))


def run(aggregator: Aggregator, spokes: list[str], cases: list[CaseView],
        min_cell_size: int) -> Aggregate:
    if min_cell_size < 1:
        raise ValueError("the minimum cell size k must be at least 1")
    return assemble(aggregator, [g for g, _ in groups(aggregator, spokes, cases)],
                    min_cell_size)
