"""Aggregates of experiments in the database: compute one from the stored results, keep it
as a versioned snapshot, and read the latest. The figures come from the pure engine in
``hub/aggregation``; this module only reads rows and stores snapshots. Results only mark a
study stale; :mod:`tributary.hub.services.debounce` decides when to recompute."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter, OrderedDict
from datetime import UTC, datetime, timedelta
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
    Aggregator,
    AggregatorParameterError,
    CaseView,
    Figure,
    GroupReport,
    get_aggregator,
)
from tributary.hub.aggregation.detection import match_findings
from tributary.hub.aggregation.engine import assemble, groups
from tributary.hub.aggregation.partial import total
from tributary.hub.aggregation.report import FullPass, RocCurve, SnapshotInfo
from tributary.hub.aggregation.suppression import suppress_table
from tributary.hub.models import (
    FINAL_CASE_STATES,
    AggregateFull,
    AggregateSnapshot,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    utcnow,
)
from tributary.hub.services import partials

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


def _views(session: Session, experiment_id: str) -> list[CaseView]:
    """Every case as the aggregators see it (only the columns they read)."""
    rows = session.exec(select(CaseResult.spoke_id, CaseResult.case_id, CaseResult.state,
                               CaseResult.output, CaseResult.released, CaseResult.failure)
                        .where(CaseResult.experiment_id == experiment_id)
                        .order_by(CaseResult.spoke_id, CaseResult.case_id)).all()
    return [CaseView(spoke, case_id, CaseState(state), output, released or {}, failure)
            for spoke, case_id, state, output, released, failure in rows]


def _report(aggregator: Aggregator, raw: list[GroupReport], min_cell_size: int,
            results: int, full_pass: FullPass | None) -> dict[str, Any]:
    result = assemble(aggregator, raw, min_cell_size)
    return {
        "aggregator": aggregator.name,
        "parameters": aggregator.parameters.model_dump(mode="json"),
        "columns": [c.model_dump() for c in result.columns],
        "groups": {k: g.model_dump(mode="json") for k, g in result.groups.items()},
        "full_pass": None if full_pass is None else full_pass.model_dump(mode="json"),
        "results": results,
    }


def _full(session: Session, experiment: Experiment, min_cell_size: int,
          digest: str | None = None) -> dict[str, Any]:
    """A report from every result; with ``digest``, the figures that need every value are
    kept (``AggregateFull``, added to the session) for the passes in between."""
    aggregator = get_aggregator(experiment.aggregator, experiment.aggregator_parameters)
    views = _views(session, experiment.id)
    parts = groups(aggregator, _spokes(session, experiment.id), views)
    results = sum(1 for v in views if v.state in FINAL_CASE_STATES)
    if digest is not None:
        row = session.get(AggregateFull, experiment.id) or AggregateFull(
            experiment_id=experiment.id, inputs_sha256=digest, results=results,
            aggregator=aggregator.name)
        row.computed_at, row.inputs_sha256, row.results = utcnow(), digest, results
        row.aggregator = experiment.aggregator
        row.parameters = experiment.aggregator_parameters or {}
        row.groups = {g.group: {"figures": {k: f.model_dump(mode="json")
                                            for k, f in from_full.items()},
                                "roc": None if g.roc is None else g.roc.model_dump(mode="json")}
                      for g, from_full in parts}
        session.add(row)
    return _report(aggregator, [g for g, _ in parts], min_cell_size, results, None)


#: Parsed ``AggregateFull.groups``: one full pass is read by many passes in between.
_FULL: OrderedDict[tuple[Any, ...], dict[str, tuple[dict[str, Figure], RocCurve | None]]] = \
    OrderedDict()
_FULL_SIZE = 16


def _full_groups(row: AggregateFull) -> dict[str, tuple[dict[str, Figure], RocCurve | None]]:
    key = (row.experiment_id, row.inputs_sha256, row.computed_at)
    with _READS_LOCK:
        found = _FULL.get(key)
    if found is None:
        found = {name: ({k: Figure.model_validate(f) for k, f in g["figures"].items()},
                        None if g["roc"] is None else RocCurve.model_validate(g["roc"]))
                 for name, g in row.groups.items()}
        with _READS_LOCK:
            _FULL[key] = found
            while len(_FULL) > _FULL_SIZE:
                _FULL.popitem(last=False)
    return found


def _fast(session: Session, experiment: Experiment, min_cell_size: int,
          full: AggregateFull) -> dict[str, Any]:
    """A report from the cases counted by state (one grouped query), the running sums (one
    row per spoke) and the last full pass: its cost depends on the spokes, not the cases."""
    aggregator = get_aggregator(experiment.aggregator, experiment.aggregator_parameters)
    counts: dict[str, Counter[str]] = {}
    for spoke, state, n in session.exec(
            select(CaseResult.spoke_id, CaseResult.state, func.count(col(CaseResult.id)))
            .where(CaseResult.experiment_id == experiment.id)
            .group_by(CaseResult.spoke_id, CaseResult.state)):
        counts.setdefault(spoke, Counter())[CaseState(state)] += n
    # Failure reasons counted in the database (a failure always has one: the protocol's
    # Failure requires it, and a failed case without a failure stores JSON null).
    reasons: dict[str, Counter[str]] = {}
    reason = col(CaseResult.failure)["reason"].as_string()
    for spoke, why, n in session.exec(
            select(CaseResult.spoke_id, reason, func.count(col(CaseResult.id)))
            .where(CaseResult.experiment_id == experiment.id,
                   CaseResult.state == CaseState.FAILED, reason.is_not(None))
            .group_by(CaseResult.spoke_id, reason)):
        reasons.setdefault(spoke, Counter())[str(why)] += n
    sums = partials.stored(session, experiment.id)
    from_full = _full_groups(full)

    def group(name: str, members: list[str], pooled: bool) -> GroupReport:
        states: Counter[str] = sum((counts.get(m, Counter()) for m in members), Counter())
        failures: Counter[str] = sum((reasons.get(m, Counter()) for m in members), Counter())
        figures, roc = from_full.get(name, ({}, None))
        return GroupReport(
            group=name, pooled=pooled, cases=sum(states.values()),
            succeeded=states[CaseState.SUCCEEDED], failed=states[CaseState.FAILED],
            pending=states[CaseState.QUEUED] + states[CaseState.RUNNING],
            failure_reasons=dict(sorted(failures.items())),
            figures=aggregator.merge(aggregator.sum_figures(
                total(sums.get(m, {}) for m in members)), figures), roc=roc)

    everyone = sorted(set(counts) | set(sums))
    raw = [group(spoke, [spoke], False) for spoke in sorted(_spokes(session, experiment.id))]
    raw.append(group(POOLED, everyone, True))
    results = sum(n for c in counts.values() for state, n in c.items()
                  if state in FINAL_CASE_STATES)
    keys = list(dict.fromkeys(k for figures, _ in from_full.values() for k in figures))
    return _report(aggregator, raw, min_cell_size, results,
                   FullPass(computed_at=full.computed_at, results=full.results, figures=keys))


def _full_row(session: Session, experiment_id: str) -> AggregateFull | None:
    return session.exec(select(AggregateFull)
                        .options(defer(AggregateFull.groups))  # type: ignore[arg-type]
                        .where(AggregateFull.experiment_id == experiment_id)).first()


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _latest_row(session: Session, experiment_id: str) -> AggregateSnapshot | None:
    """The latest snapshot row; its report (large) is loaded only when read, and
    :func:`read_snapshot` reads it once per process."""
    return session.exec(select(AggregateSnapshot)
                        .options(defer(AggregateSnapshot.report))  # type: ignore[arg-type]
                        .where(AggregateSnapshot.experiment_id == experiment_id)
                        .order_by(col(AggregateSnapshot.version).desc()).limit(1)).first()


def full_behind(session: Session, experiment: Experiment, digest: str) -> bool:
    """Whether the last full pass read fewer results than ``digest`` stands for (the
    figures that need every value lag behind the others)."""
    full = _full_row(session, experiment.id)
    return full is None or full.inputs_sha256 != digest


def refresh(session: Session, experiment_id: str, min_cell_size: int,
            full_interval: float | None = None) -> AggregateSnapshot | None:
    """Store a new snapshot if the inputs changed since the latest; return the latest.

    Without ``full_interval`` every figure is computed from every result (a full pass).
    With it, a running study whose results ingest keeps running sums of gets a full pass
    at most once per ``full_interval`` seconds, and in between a snapshot from the sums,
    the counts by state and the last full pass's other figures (see :func:`_fast`).
    Safe to run concurrently (separate workers): a lost race on the version number is
    retried against the winner's snapshot."""
    for _ in range(5):
        experiment = session.get(Experiment, experiment_id)
        if experiment is None:
            return None
        digest = inputs_digest(session, experiment, min_cell_size)
        latest_row = _latest_row(session, experiment_id)
        full = _full_row(session, experiment_id)
        same = full is not None and full.aggregator == experiment.aggregator \
            and full.parameters == (experiment.aggregator_parameters or {})
        full_due = (full_interval is None or not experiment.aggregate_incremental
                    or experiment.state != ExperimentState.LAUNCHED or full is None
                    or not same or utcnow() - _aware(full.computed_at)
                    >= timedelta(seconds=full_interval))
        if latest_row is not None and latest_row.inputs_sha256 == digest and (
                not full_due or (same and full is not None
                                 and full.inputs_sha256 == digest)):
            return latest_row
        if full_due:
            report = _full(session, experiment, min_cell_size, digest)
        else:
            assert full is not None
            report = _fast(session, experiment, min_cell_size, full)
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
    if utcnow() - computed >= STALE_GRACE and not _debouncer_here():
        # No debouncer reached it (a broker outage lost the task, or no hub runs one):
        # ask again, without making this read wait (a worker, or a thread of this process).
        tasks.aggregate_in_background(experiment.id)
        session.expire_all()
        newer = _latest_row(session, experiment.id)
        if newer is not None and newer.version != row.version:
            current = newer.inputs_sha256 == inputs_digest(session, experiment, min_cell_size)
            return read_snapshot(newer, current, received(session, experiment.id))
    return read_snapshot(row, False, received(session, experiment.id))


def _debouncer_here() -> bool:
    """A debouncer of this process recomputes in-process at its own, bounded pace (and
    waits longer after a long pass): a read need not ask it."""
    from tributary.hub.services import debounce  # it imports this module

    return debounce.recomputes_here(STALE_GRACE.total_seconds())


def history(session: Session, experiment_id: str) -> list[SnapshotInfo]:
    rows = session.exec(select(AggregateSnapshot).where(
        AggregateSnapshot.experiment_id == experiment_id)
        .order_by(col(AggregateSnapshot.version))).all()
    return [SnapshotInfo(version=r.version, computed_at=r.computed_at, results=r.results,
                         min_cell_size=r.min_cell_size) for r in rows]


def aggregate(session: Session, experiment: Experiment, min_cell_size: int = 5) -> AggregateRead:
    """Compute an aggregate now, without storing it (version 0): for checks and tests."""
    report = _full(session, experiment, min_cell_size)
    return AggregateRead(experiment_id=experiment.id, version=0, computed_at=utcnow(),
                         results=report.pop("results"), min_cell_size=min_cell_size, **report)
