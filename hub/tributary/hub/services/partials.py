"""Running sums of a study's results, kept by ingest (``AggregatePartial``, one row per
study and spoke). A batch collects what each stored result adds (and, for a result that
replaces an earlier one of the same case, what the earlier one takes away) and writes the
sums once, in the batch's own transaction: a result counts exactly once because it is
applied exactly once, and a rolled-back batch leaves the sums as they were. Only succeeded
cases count (an incremental aggregator's ``contribution`` of any other case is empty)."""

from __future__ import annotations

import logging

from sqlalchemy import insert, update
from sqlmodel import Session, col, select

from tributary.hub.aggregation import Aggregator, CaseView, get_aggregator
from tributary.hub.aggregation.partial import Sums, add, dump, load
from tributary.hub.models import AggregatePartial, CaseResult, CaseState, Experiment

log = logging.getLogger(__name__)


def view(row: CaseResult) -> CaseView:
    return CaseView(row.spoke_id, row.case_id, row.state, row.output, row.released or {},
                    row.failure)


class PartialUpdates:
    """What one ingest batch changes in the running sums."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.deltas: dict[tuple[str, str], Sums] = {}
        self._aggregators: dict[str, Aggregator | None] = {}

    def _aggregator(self, experiment: Experiment) -> Aggregator | None:
        if experiment.id not in self._aggregators:
            found = None
            if experiment.aggregate_incremental:
                try:
                    aggregator = get_aggregator(experiment.aggregator,
                                                experiment.aggregator_parameters)
                    found = aggregator if aggregator.incremental else None
                except ValueError:
                    self._give_up(experiment, "its aggregator cannot be loaded")
            self._aggregators[experiment.id] = found
        return self._aggregators[experiment.id]

    def _give_up(self, experiment: Experiment, why: str) -> None:
        """Fall back to full recomputation for good: the sums would be incomplete."""
        log.warning("study %s: no more running sums (%s); full recomputation instead",
                    experiment.id, why)
        experiment.aggregate_incremental = False
        self.session.add(experiment)
        self._aggregators[experiment.id] = None
        for key in [k for k in self.deltas if k[0] == experiment.id]:
            del self.deltas[key]

    def replace(self, experiment: Experiment, old: CaseView, new: CaseView) -> None:
        """The case ``old`` is now ``new`` (called before the row changes is fine: the
        views are taken by the caller)."""
        aggregator = self._aggregator(experiment)
        if aggregator is None:
            return
        try:
            delta: Sums = {}
            if old.state == CaseState.SUCCEEDED:
                add(delta, aggregator.contribution(old), -1)
            if new.state == CaseState.SUCCEEDED:
                add(delta, aggregator.contribution(new))
        except Exception as exc:  # a plugin's bug or an output it cannot read
            self._give_up(experiment, f"{type(exc).__name__}: {exc}")
            return
        if delta:
            add(self.deltas.setdefault((experiment.id, new.spoke_id), {}), delta)

    def write(self) -> None:
        """Add the batch's deltas to the stored sums: one read, then one UPDATE statement
        for the rows that exist and one INSERT for those that do not (per batch, not per
        spoke: a batch of 100 results may touch 100 spokes)."""
        changed = {key: delta for key, delta in self.deltas.items() if delta}
        self.deltas = {}
        if not changed:
            return
        rows = {(e, s): sums for e, s, sums in self.session.exec(
            select(AggregatePartial.experiment_id, AggregatePartial.spoke_id,
                   AggregatePartial.sums).where(
                col(AggregatePartial.experiment_id).in_({k[0] for k in changed}),
                col(AggregatePartial.spoke_id).in_({k[1] for k in changed})))}
        updates, inserts = [], []
        for key, delta in sorted(changed.items()):
            values = {"experiment_id": key[0], "spoke_id": key[1],
                      "sums": dump(add(load(rows.get(key)), delta))}
            (updates if key in rows else inserts).append(values)
        if updates:
            self.session.execute(update(AggregatePartial), updates)
        if inserts:
            self.session.execute(insert(AggregatePartial), inserts)


def stored(session: Session, experiment_id: str) -> dict[str, Sums]:
    """The running sums of every spoke of a study."""
    return {row.spoke_id: load(row.sums) for row in session.exec(
        select(AggregatePartial).where(AggregatePartial.experiment_id == experiment_id))}
