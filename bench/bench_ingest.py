"""Ingest rate of signed results as a study grows, in-process, the way the hub's results
consumer stores them (verify the custody record, store, audit, in batches of the consumer's
``results_batch_size`` per transaction; aggregation configured as in a single-process hub,
Celery eager, its debouncer running). Prints results/s, CPU ms per result for the whole
process and for the ingesting thread alone, over a window of results ending at each size,
each with its ratio to the first window of the same run (the baseline): a flat ratio near 1
means constant cost per result. ``--batch 1`` stores one message per transaction (the
consumer's path before batches).

``--aggregation full incremental`` (the default) runs the same results twice in one
process: a study recomputed in full at every debouncer pass (as before running sums, and
as studies created before them still are), then one whose snapshots come from running sums
with a full pass every ``--full-interval`` seconds; each run also gives the CPU its
debouncer took, per result and as a share of a core.

    .venv/bin/python bench/bench_ingest.py [--sizes 1000 10000 30000] [--window 1000]
        [--batch 100] [--spokes 3] [--aggregation full incremental] [--rate 0]
        [--database-url postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlmodel import Session

from tributary.hub import worker
from tributary.hub.db import open_database
from tributary.hub.models import (
    Algorithm,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Spoke,
    SpokeKey,
    TargetState,
)
from tributary.hub.services import debounce
from tributary.hub.services.ingest import ingest, ingest_batch
from tributary.hub.settings import HubSettings
from tributary.protocol.custody import GENESIS, CustodyRecord, record_hash, sign_custody
from tributary.protocol.messages import CaseStatus, ExperimentStatusMessage, ResultMessage
from tributary.protocol.messages import ExperimentState as SpokeState
from tributary.protocol.signing import SigningKey

SPOKES = ["north", "river", "clare"]
DIGEST = "sha256:" + "0" * 64


def build(engine, cases: int, incremental: bool) -> dict[str, SigningKey]:  # type: ignore[no-untyped-def]
    keys = {s: SigningKey.generate() for s in SPOKES}
    with Session(engine) as session:
        session.add(Algorithm(id=1, name="a", version="1", repository="r/a", digest=DIGEST))
        for spoke, key in keys.items():
            session.add(Spoke(id=spoke, name=spoke))
            session.flush()
            session.add(SpokeKey(keyid=key.keyid, spoke_id=spoke, public_key_pem=key.public.pem))
        session.add(Experiment(id="exp", name="bench", algorithm_id=1,
                               aggregator="binary-classification",
                               aggregator_parameters={"score": "p", "label": "y"},
                               state=ExperimentState.LAUNCHED,
                               aggregate_incremental=incremental))
        session.flush()
        for spoke in SPOKES:
            session.add(ExperimentTarget(experiment_id="exp", spoke_id=spoke,
                                         state=TargetState.PUBLISHED))
        session.commit()
        for n, spoke in enumerate(SPOKES):
            ingest(session, ExperimentStatusMessage(
                experiment_id="exp", spoke_id=spoke, state=SpokeState.ACCEPTED,
                case_ids=[f"c{i}" for i in range(n, cases, len(SPOKES))]))
    return keys


def messages(keys: dict[str, SigningKey], cases: int) -> list[ResultMessage]:
    """Signed results, made before timing (signing is the spokes' cost, not the hub's)."""
    rng = np.random.default_rng(3)
    heads = {s: (0, GENESIS) for s in SPOKES}
    out = []
    for i in range(cases):
        spoke = SPOKES[i % len(SPOKES)]
        label = int(rng.random() < 0.4)
        result = ResultMessage(
            experiment_id="exp", spoke_id=spoke, case_id=f"c{i}", status=CaseStatus.SUCCEEDED,
            output={"p": float(rng.normal(label, 1.0))}, released={"y": label},
            image_digest=DIGEST, finished_at=datetime.now(UTC))
        sequence, head = heads[spoke]
        record = CustodyRecord(
            experiment_id="exp", spoke_id=spoke, case_id=result.case_id, attempt=1,
            sequence=sequence + 1, previous_record_sha256=head, image_digest=DIGEST,
            participant_sha256="1" * 64, input_sha256="2" * 64, deid_profile="bench",
            spoke_version="bench", started_at=None, finished_at=result.finished_at,
            status=result.status.value, exit_code=0, failure_reason=None)
        envelope = sign_custody(keys[spoke], record, result)
        heads[spoke] = (sequence + 1, record_hash(envelope))
        out.append(result.model_copy(update={"custody": envelope}))
    return out


def run(args: argparse.Namespace, incremental: bool
        ) -> tuple[dict[str, dict[int, float]], float, int]:
    """Ingest every result (the same ones each run: a fixed seed, signed by this run's keys
    before timing) into a fresh database; the clocks at each size (wall, process CPU,
    ingesting thread CPU, debouncer CPU), the debouncer's CPU in all and its passes."""
    total = max(args.sizes)
    with tempfile.TemporaryDirectory() as tmp:
        settings = HubSettings(database_url=args.database_url
                               or f"sqlite:///{Path(tmp) / 'hub.db'}",
                               audit_log=Path(tmp) / "hub-audit.jsonl",
                               aggregate_full_interval_seconds=args.full_interval)
        engine = open_database(settings)
        worker.configure(settings, engine)  # as the hub does: eager aggregation tasks
        debouncer = debounce.start(settings, engine)  # as the hub does
        keys = build(engine, total, incremental)
        signed = messages(keys, total)
        clocks: dict[str, dict[int, float]] = {
            "wall": {0: time.perf_counter()}, "cpu": {0: time.process_time()},
            "own": {0: time.thread_time()}, "debouncer": {0: debouncer.cpu_seconds}}
        wanted = {s - args.window for s in args.sizes} | set(args.sizes)
        for start in range(0, total, args.batch):
            with Session(engine) as session:
                assert all(o is True for o in ingest_batch(
                    session, signed[start:start + args.batch]))
            if args.rate:  # as results arrive through the broker, not as fast as possible
                ahead = clocks["wall"][0] + (start + args.batch) / args.rate \
                    - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            if (i := start + args.batch) in wanted:
                clocks["wall"][i], clocks["cpu"][i] = time.perf_counter(), time.process_time()
                clocks["own"][i] = time.thread_time()
                clocks["debouncer"][i] = debouncer.cpu_seconds
        debouncer.stop()
        engine.dispose()
    return clocks, debouncer.cpu_seconds, debouncer.recomputed


def report(args: argparse.Namespace, label: str, clocks: dict[str, dict[int, float]],
           debouncer_cpu: float, passes: int) -> str:
    total, window = max(args.sizes), args.window

    def cost(size: int, clock: str = "cpu") -> float:
        """CPU ms per result (steadier than wall time on a machine shared with others)."""
        return (clocks[clock][size] - clocks[clock][size - window]) / window * 1000

    marks = clocks["wall"]
    base = window / (marks[window] - marks[0])
    print(f"\n{label}: {'results':>8} {'results/s':>10} {'ratio':>6} {'CPU ms/result':>14} "
          f"{'ratio':>6} {'ingest thread':>14} {'ratio':>6} {'debouncer ms/result':>20}")
    for size in args.sizes:
        rate = window / (marks[size] - marks[size - window])
        print(f"{label}: {size:>8} {rate:>10.1f} {rate / base:>6.2f} {cost(size):>14.2f} "
              f"{cost(size) / cost(window):>6.2f} {cost(size, 'own'):>14.2f} "
              f"{cost(size, 'own') / cost(window, 'own'):>6.2f} "
              f"{cost(size, 'debouncer'):>20.2f}")
    elapsed = marks[total] - marks[0]
    whole = (clocks["cpu"][total] - clocks["cpu"][0]) / total * 1000
    print(f"{label}: {total} results in {elapsed:.1f} s, {total / elapsed:.1f}/s, "
          f"{whole:.2f} ms CPU a result in all; the debouncer {debouncer_cpu:.1f} s of CPU, "
          f"{debouncer_cpu / elapsed:.2f} of a core, {debouncer_cpu / total * 1000:.2f} "
          f"ms a result, in {passes} passes ({debouncer_cpu / max(1, passes) * 1000:.0f} ms "
          f"each, a new snapshot every {elapsed / max(1, passes):.1f} s)")
    return (f"{label} {total / elapsed:.0f}/s, CPU {cost(window):.2f} then {cost(total):.2f} "
            f"ms/result, debouncer {debouncer_cpu / elapsed:.2f} core, a snapshot every "
            f"{elapsed / max(1, passes):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 30000])
    parser.add_argument("--window", type=int, default=1000,
                        help="results per measured window (the first is the baseline)")
    parser.add_argument("--batch", type=int, default=HubSettings().results_batch_size,
                        help="messages per transaction, as the results consumer takes them")
    parser.add_argument("--spokes", type=int, default=len(SPOKES),
                        help="spokes the study's results come from")
    parser.add_argument("--aggregation", nargs="+", choices=["full", "incremental"],
                        default=["full", "incremental"],
                        help="full recomputation at every pass, or running sums; in order")
    parser.add_argument("--full-interval", type=float,
                        default=HubSettings().aggregate_full_interval_seconds,
                        help="seconds between full passes of an incremental study")
    parser.add_argument("--rate", type=float, default=0,
                        help="results a second at most (0: as fast as possible); a study "
                             "that runs for longer shows the debouncer's steady state")
    parser.add_argument("--database-url", default=None,
                        help="an empty database to use (default: SQLite in a temporary folder)")
    args = parser.parse_args()
    if any(size % args.batch or size < args.window for size in args.sizes) \
            or args.window % args.batch:
        parser.error("sizes and window must be multiples of the batch, sizes >= window")
    SPOKES[:] = [f"spoke-{i:03d}" for i in range(args.spokes)] if args.spokes != 3 else SPOKES
    lines = []
    for mode in args.aggregation:
        clocks, debouncer_cpu, passes = run(args, mode == "incremental")
        lines.append(report(args, mode, clocks, debouncer_cpu, passes))
    database = (args.database_url or "sqlite").split(":")[0]
    print(f"\nbench-ingest ({database}, batches of {args.batch}, {len(SPOKES)} spokes): "
          + "; ".join(lines))


if __name__ == "__main__":
    main()
