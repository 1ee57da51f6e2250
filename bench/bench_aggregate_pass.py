"""CPU time of one recomputation of a study's aggregate snapshot as the study grows, the way
the debouncer (or a Celery worker) makes it: a full pass over every result, and, between
full passes, a snapshot from the running sums ingest keeps (counts by state, one row of
sums per spoke, the last full pass's AUC, ROC curves and quantiles). Realistic case rows
(custody record, output, released attributes) spread over ``--spokes`` spokes; each pass
follows a change of one result, so a new snapshot is stored each time. The full pass of
the same run is the baseline: its cost grows with the study, the other's should not.

    .venv/bin/python bench/bench_aggregate_pass.py [--sizes 1000 10000 30000]
        [--spokes 200] [--aggregator binary-classification|summary] [--repeats 5]

On a hub from before running sums (no ``aggregate_full_interval_seconds`` setting) it
times the full pass only, so the same script gives that baseline too.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_hub_pages import EXPERIMENT, fill
from sqlmodel import Session, col, select

from tributary.hub.db import open_database
from tributary.hub.models import CaseResult, CaseState, Experiment
from tributary.hub.services.aggregation import refresh
from tributary.hub.settings import HubSettings

INCREMENTAL = "aggregate_full_interval_seconds" in HubSettings.model_fields
PARAMETERS = {"binary-classification": {"score": "p", "label": "y"}, "summary": {}}


def seed_sums(session: Session) -> None:
    """The running sums ingest would have kept for the rows ``fill`` wrote directly."""
    from tributary.hub.aggregation import CaseView, get_aggregator
    from tributary.hub.aggregation.partial import add, dump
    from tributary.hub.models import AggregatePartial

    experiment = session.get(Experiment, EXPERIMENT)
    assert experiment is not None
    aggregator = get_aggregator(experiment.aggregator, experiment.aggregator_parameters)
    sums: dict[str, dict[str, int]] = {}
    for row in session.exec(select(CaseResult).where(
            CaseResult.experiment_id == EXPERIMENT, CaseResult.state == CaseState.SUCCEEDED)):
        add(sums.setdefault(row.spoke_id, {}), aggregator.contribution(CaseView(
            row.spoke_id, row.case_id, row.state, row.output, row.released or {}, row.failure)))
    for spoke, values in sums.items():
        session.add(AggregatePartial(experiment_id=EXPERIMENT, spoke_id=spoke, sums=dump(values)))
    session.commit()


def one_more_result(session: Session, n: int) -> None:
    """A running case gets its result (the inputs digest changes: a new snapshot is due)."""
    row = session.exec(select(CaseResult).where(CaseResult.experiment_id == EXPERIMENT,
                                                CaseResult.state == CaseState.RUNNING)
                       .order_by(col(CaseResult.id)).offset(n).limit(1)).one()
    row.state, row.output = CaseState.SUCCEEDED, {"p": 0.5, "nodules": 1, "volume_ml": 2.0}
    session.add(row)
    session.commit()


def measure(size: int, spokes: int, aggregator: str, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = HubSettings(database_url=f"sqlite:///{Path(tmp) / 'hub.db'}",
                               audit_log=Path(tmp) / "hub-audit.jsonl")
        engine = open_database(settings)
        fill(engine, spokes, size // spokes)
        with Session(engine) as session:
            experiment = session.get(Experiment, EXPERIMENT)
            assert experiment is not None
            experiment.aggregator = aggregator
            experiment.aggregator_parameters = PARAMETERS[aggregator]
            session.add(experiment)
            session.commit()
            if INCREMENTAL:
                experiment.aggregate_incremental = True
                session.add(experiment)
                seed_sums(session)
        costs: dict[str, list[float]] = {"full": [], "between": []}
        with Session(engine) as session:
            refresh(session, EXPERIMENT, 5)  # the first snapshot (and full pass)
            for mode in costs if INCREMENTAL else ["full"]:
                # Between full passes, the last one's figures are read (and parsed once).
                for n in range(repeats + (mode == "between")):
                    one_more_result(session, 0)
                    session.expire_all()
                    started = time.process_time()
                    if mode == "full":
                        refresh(session, EXPERIMENT, 5)
                    else:
                        refresh(session, EXPERIMENT, 5, 3600.0)
                    if n or mode == "full":
                        costs[mode].append((time.process_time() - started) * 1000)
        engine.dispose()
    return {mode: statistics.median(values) for mode, values in costs.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 30000])
    parser.add_argument("--spokes", type=int, default=200)
    parser.add_argument("--aggregator", choices=sorted(PARAMETERS),
                        default="binary-classification")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = {size: measure(size, args.spokes, args.aggregator, args.repeats)
            for size in args.sizes}
    first = args.sizes[0]
    print(f"{'cases':>7} {'full pass ms CPU':>17} {'ratio':>6} {'between ms CPU':>15} "
          f"{'ratio':>6} {'between/full':>13}")
    for size, cost in rows.items():
        between = cost.get("between")
        print(f"{size:>7} {cost['full']:>17.1f} {cost['full'] / rows[first]['full']:>6.2f} "
              + (f"{between:>15.1f} {between / rows[first]['between']:>6.2f} "
                 f"{between / cost['full']:>13.3f}" if between else f"{'-':>15}"))
    sizes = "/".join(str(s) for s in args.sizes)
    full = "/".join(f"{rows[s]['full']:.0f}" for s in args.sizes)
    between = "/".join(f"{rows[s]['between']:.0f}" for s in args.sizes) if INCREMENTAL else "-"
    print(f"aggregate-pass ({args.aggregator}, {args.spokes} spokes): full {full} ms, between "
          f"full passes {between} ms CPU at {sizes} cases")


if __name__ == "__main__":
    main()
