"""Cost of re-aggregating an experiment when a result arrives, against a baseline in the
same process: reading the same result rows from the database without computing anything.
Prints milliseconds per re-aggregation and the ratio, for growing studies, and the cost of
a redundant task (inputs unchanged: digest only, nothing stored).

    .venv/bin/python bench/bench_aggregation.py [--cases 500 2000 8000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlmodel import Session, select

from tributary.hub.db import make_engine
from tributary.hub.models import (
    AggregateSnapshot,
    Algorithm,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentTarget,
    Spoke,
)
from tributary.hub.services.aggregation import refresh

SPOKES = ["north", "river", "clare"]


def build(session: Session, cases: int) -> None:
    rng = np.random.default_rng(3)
    session.add(Algorithm(id=1, name="a", version="1", repository="r/a",
                          digest="sha256:" + "0" * 64))
    for spoke in SPOKES:
        session.add(Spoke(id=spoke, name=spoke))
    session.flush()
    session.add(Experiment(id="exp", name="bench", algorithm_id=1,
                           aggregator="binary-classification",
                           aggregator_parameters={"score": "p", "label": "y"}))
    session.flush()
    for spoke in SPOKES:
        session.add(ExperimentTarget(experiment_id="exp", spoke_id=spoke))
    labels = rng.random(cases) < 0.4
    scores = rng.normal(labels.astype(float), 1.0)
    for i in range(cases):
        session.add(CaseResult(experiment_id="exp", spoke_id=SPOKES[i % 3], case_id=f"c{i}",
                               state=CaseState.SUCCEEDED, output={"p": float(scores[i])},
                               released={"y": int(labels[i])}, result_message_id=f"m{i}"))
    session.commit()


def timed(action, repeats: int) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for _ in range(repeats):
        action()
    return (time.perf_counter() - t0) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, nargs="+", default=[500, 2000, 8000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'cases':>7} {'read rows ms':>13} {'re-aggregate ms':>16} {'ratio':>6} "
          f"{'redundant task ms':>18}")
    for cases in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            engine = make_engine(f"sqlite:///{Path(tmp) / 'hub.db'}")
            with Session(engine) as session:
                build(session, cases)

                def read() -> None:
                    session.expire_all()
                    session.exec(select(CaseResult).where(
                        CaseResult.experiment_id == "exp")).all()

                def recompute() -> None:
                    for snapshot in session.exec(select(AggregateSnapshot)).all():
                        session.delete(snapshot)
                    session.commit()
                    refresh(session, "exp", 5)

                baseline = timed(read, args.repeats)
                full = timed(recompute, args.repeats)
                redundant = timed(lambda: refresh(session, "exp", 5), args.repeats)
            engine.dispose()
        print(f"{cases:>7} {baseline:>13.1f} {full:>16.1f} {full / baseline:>6.1f} "
              f"{redundant:>18.2f}")


if __name__ == "__main__":
    main()
