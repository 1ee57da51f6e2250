"""Aggregates of experiments in the database: compute one from the stored results, keep it
as a versioned snapshot, and read the latest. The figures come from the pure engine in
``hub/aggregation``; this module only reads rows and stores snapshots. Results only mark a
study stale; :mod:`tributary.hub.services.debounce` decides when to recompute."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from datetime import UTC, timedelta
from typing import Any

from sqlalchemy import case, func
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import defer
from sqlmodel import Session, col, select

from tributary.hub import tasks
from tributary.hub.aggregation import (
    AGGREGATORS,
    POOLED,
    AggregateRead,
    AggregatorParameterError,
    CaseView,
    get_aggregator,
    run,
)
from tributary.hub.aggregation.detection import match_findings
from tributary.hub.aggregation.report import SnapshotInfo
from tributary.hub.aggregation.suppression import suppress_table
from tributary.hub.models import (
    FINAL_CASE_STATES,
    AggregateSnapshot,
    CaseResult,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    utcnow,
)

__all__ = ["AGGREGATORS", "POOLED", "AggregatorParameterError", "aggregate", "history",
           "latest", "match_findings", "read_snapshot", "refresh", "validate_parameters"]


def validate_parameters(aggregator: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The parameters with defaults filled in; ValueError saying what is wrong otherwise."""
    return get_aggregator(aggregator, parameters).parameters.model_dump(mode="json")


def _spokes(session: Session, experiment_id: str) -> list[str]:
    return list(session.exec(select(ExperimentTarget.spoke_id).where(
        ExperimentTarget.experiment_id == experiment_id)).all())


def inputs_digest(session: Session, experiment: Experiment, min_cell_size: int) -> str:
    """A digest of everything an aggregate depends on, from one summary query: cases, final
    results and their attempts and arrival, targets, aggregator, parameters and k. Equal
    digests mean an equal aggregate, so a redundant task stores nothing."""
    final = [s.value for s in FINAL_CASE_STATES]
    row = session.exec(select(
        func.count(col(CaseResult.id)),
        func.sum(case((col(CaseResult.state).in_(final), 1), else_=0)),
        func.sum(CaseResult.attempt), func.max(CaseResult.received_at),
        func.max(CaseResult.result_message_id),
    ).where(CaseResult.experiment_id == experiment.id)).one()
    payload = {"cases": list(row[:3]), "last": str(row[3]), "message": row[4],
               "spokes": sorted(_spokes(session, experiment.id)),
               "aggregator": experiment.aggregator,
               "parameters": experiment.aggregator_parameters, "k": min_cell_size}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _compute(session: Session, experiment: Experiment, min_cell_size: int) -> dict[str, Any]:
    aggregator = get_aggregator(experiment.aggregator, experiment.aggregator_parameters)
    rows = session.exec(select(CaseResult).where(CaseResult.experiment_id == experiment.id)
                        .order_by(CaseResult.spoke_id, CaseResult.case_id)).all()
    views = [CaseView(r.spoke_id, r.case_id, r.state, r.output, r.released or {}, r.failure)
             for r in rows]
    result = run(aggregator, _spokes(session, experiment.id), views, min_cell_size)
    return {
        "aggregator": aggregator.name,
        "parameters": aggregator.parameters.model_dump(mode="json"),
        "columns": [c.model_dump() for c in result.columns],
        "groups": {k: g.model_dump(mode="json") for k, g in result.groups.items()},
        "results": sum(1 for r in rows if r.state in FINAL_CASE_STATES),
    }


def _latest_row(session: Session, experiment_id: str) -> AggregateSnapshot | None:
    """The latest snapshot row; its report (large) is loaded only when read, and
    :func:`read_snapshot` reads it once per process."""
    return session.exec(select(AggregateSnapshot)
                        .options(defer(AggregateSnapshot.report))  # type: ignore[arg-type]
                        .where(AggregateSnapshot.experiment_id == experiment_id)
                        .order_by(col(AggregateSnapshot.version).desc()).limit(1)).first()


def refresh(session: Session, experiment_id: str, min_cell_size: int) -> AggregateSnapshot | None:
    """Store a new snapshot if the inputs changed since the latest; return the latest.
    Safe to run concurrently (separate workers): a lost race on the version number is
    retried against the winner's snapshot."""
    for _ in range(5):
        experiment = session.get(Experiment, experiment_id)
        if experiment is None:
            return None
        digest = inputs_digest(session, experiment, min_cell_size)
        latest_row = _latest_row(session, experiment_id)
        if latest_row is not None and latest_row.inputs_sha256 == digest:
            return latest_row
        report = _compute(session, experiment, min_cell_size)
        snapshot = AggregateSnapshot(
            experiment_id=experiment_id, version=(latest_row.version if latest_row else 0) + 1,
            inputs_sha256=digest, results=report.pop("results"), min_cell_size=min_cell_size,
            report=report, computed_at=utcnow())
        session.add(snapshot)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            continue
        session.refresh(snapshot)
        return snapshot
    raise RuntimeError(f"could not store an aggregate of {experiment_id}: too much contention")


#: Stored snapshots never change: each is parsed and suppressed once per process.
_READS: OrderedDict[tuple[Any, ...], AggregateRead] = OrderedDict()
_READS_LOCK = threading.Lock()
_READS_SIZE = 64


def read_snapshot(snapshot: AggregateSnapshot, current: bool = True,
                  received: int | None = None) -> AggregateRead:
    """A stored snapshot, suppressed again on the way out: snapshots stored before
    complementary suppression still held recoverable figures and n's below k. Kept parsed
    per snapshot (a study of 200 spokes is a large report); treat the result as read-only."""
    key = (snapshot.id, snapshot.experiment_id, snapshot.version, snapshot.computed_at,
           snapshot.min_cell_size, snapshot.inputs_sha256)
    with _READS_LOCK:
        report = _READS.get(key)
        if report is not None:
            _READS.move_to_end(key)
    if report is None:
        report = AggregateRead(experiment_id=snapshot.experiment_id, version=snapshot.version,
                               computed_at=snapshot.computed_at, results=snapshot.results,
                               min_cell_size=snapshot.min_cell_size, **snapshot.report)
        report.groups = suppress_table(report.groups, POOLED, snapshot.min_cell_size)
        with _READS_LOCK:
            _READS[key] = report
            while len(_READS) > _READS_SIZE:
                _READS.popitem(last=False)
    return report.model_copy(update={"current": current, "received": received})


def received(session: Session, experiment_id: str) -> int:
    """Final results received so far (one count over the case index)."""
    final = [s.value for s in FINAL_CASE_STATES]
    return session.exec(select(func.count(col(CaseResult.id))).where(
        CaseResult.experiment_id == experiment_id,
        col(CaseResult.state).in_(final))).one()


#: How long a snapshot may lag behind the results before a read asks for a new one;
#: normally the debouncer (services/debounce.py) is much faster.
STALE_GRACE = timedelta(seconds=10)


def latest(session: Session, experiment: Experiment, min_cell_size: int,
           version: int | None = None) -> AggregateRead:
    """The latest snapshot (or ``version``), saying how many of the results received it
    covers. Without any snapshot yet, when k changed, or once the experiment is over, an
    out-of-date snapshot is recomputed now; while it runs, a snapshot older than the latest
    results is returned flagged ``current=False`` (the debouncer computes the next one)."""
    if version is not None:
        row = session.exec(select(AggregateSnapshot)
                           .options(defer(AggregateSnapshot.report))  # type: ignore[arg-type]
                           .where(AggregateSnapshot.experiment_id == experiment.id,
                                  AggregateSnapshot.version == version)).first()
        if row is None:
            raise LookupError(f"experiment {experiment.id} has no aggregate version {version}")
        return read_snapshot(row, current=False)
    row = _latest_row(session, experiment.id)
    if row is None or row.min_cell_size != min_cell_size:
        row = refresh(session, experiment.id, min_cell_size)
        assert row is not None
        return read_snapshot(row, received=row.results)
    if row.inputs_sha256 == inputs_digest(session, experiment, min_cell_size):
        return read_snapshot(row, received=row.results)
    if experiment.state in (ExperimentState.COMPLETED, ExperimentState.CANCELLED):
        # Over: the final aggregate is owed now, not at the next debouncer pass.
        row = refresh(session, experiment.id, min_cell_size)
        assert row is not None
        return read_snapshot(row, received=row.results)
    computed = row.computed_at
    if computed.tzinfo is None:  # SQLite keeps no time zone; the hub writes UTC
        computed = computed.replace(tzinfo=UTC)
    if utcnow() - computed >= STALE_GRACE:
        # No debouncer reached it (a broker outage lost the task, or no hub runs one):
        # ask again. Eager mode computes now; with a broker, a worker catches up.
        tasks.aggregate_experiment(experiment.id)
        session.expire_all()
        newer = _latest_row(session, experiment.id)
        if newer is not None and newer.version != row.version:
            current = newer.inputs_sha256 == inputs_digest(session, experiment, min_cell_size)
            return read_snapshot(newer, current, received(session, experiment.id))
    return read_snapshot(row, False, received(session, experiment.id))


def history(session: Session, experiment_id: str) -> list[SnapshotInfo]:
    rows = session.exec(select(AggregateSnapshot).where(
        AggregateSnapshot.experiment_id == experiment_id)
        .order_by(col(AggregateSnapshot.version))).all()
    return [SnapshotInfo(version=r.version, computed_at=r.computed_at, results=r.results,
                         min_cell_size=r.min_cell_size) for r in rows]


def aggregate(session: Session, experiment: Experiment, min_cell_size: int = 5) -> AggregateRead:
    """Compute an aggregate now, without storing it (version 0): for checks and tests."""
    report = _compute(session, experiment, min_cell_size)
    return AggregateRead(experiment_id=experiment.id, version=0, computed_at=utcnow(),
                         results=report.pop("results"), min_cell_size=min_cell_size, **report)
