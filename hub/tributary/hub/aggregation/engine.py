"""Runs an aggregator over an experiment's cases: one group per targeted spoke and one
pooled group, suppressed against k as one table (primary and complementary). Pure: no
database, so it is tested on plain inputs and gives the same figures wherever it runs (hub
process or Celery worker)."""

from __future__ import annotations

from dataclasses import dataclass

from tributary.hub.aggregation.base import Aggregator, CaseView
from tributary.hub.aggregation.report import POOLED, Column, GroupReport
from tributary.hub.aggregation.suppression import suppress_table


@dataclass(frozen=True)
class Aggregate:
    columns: list[Column]
    groups: dict[str, GroupReport]


def run(aggregator: Aggregator, spokes: list[str], cases: list[CaseView],
        min_cell_size: int) -> Aggregate:
    if min_cell_size < 1:
        raise ValueError("the minimum cell size k must be at least 1")
    raw = [aggregator.group(spoke, [c for c in cases if c.spoke_id == spoke], pooled=False)
           for spoke in sorted(spokes)]
    raw.append(aggregator.group(POOLED, cases, pooled=True))
    return Aggregate(columns=aggregator.columns(raw),
                     groups=suppress_table({g.group: g for g in raw}, POOLED, min_cell_size))
