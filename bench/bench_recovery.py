"""How long a study takes when a component goes away mid-study, against an undisturbed run
of the same study in the same process: hub, spoke and broker each stopped or killed
(``kill -9``) once a third of the cases are done, and brought back after ``--downtime``
seconds; an algorithm container killed and its case retried as a new attempt. Every run
is checked for exactly one accepted result per case. Prints per fault the study's total
time and its ratio to the undisturbed runs (their mean; the undisturbed study runs first,
in the middle and last, so their spread shows the noise on a shared machine), and the
recovery time: from the moment the component is started again until the hub accepts
results again. A bar chart shows the totals.

Uses a private ActiveMQ instance on free ports (the shared broker is never touched).

    .venv/bin/python bench/bench_recovery.py [--cases 12] [--spokes 3] [--downtime 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tributary import services
from tributary.services.settings import ServiceSettings
from tributary.testbed.faults import FaultRig
from tributary.testbed.federation import build_and_push

ROOT = Path(__file__).resolve().parents[1]
ARGUMENTS = {"behaviour": "slow", "seconds": 1}
console = Console(width=110)


@dataclass
class Fault:
    name: str
    inject: Callable[[], object] | None = None
    restore: Callable[[], object] | None = None
    retry: bool = False


def faults(rig: FaultRig) -> list[Fault]:
    spoke = sorted(rig.configs)[0]
    return [
        Fault("warm-up (not counted)"),  # image and page caches, first containers
        Fault("undisturbed (first)"),
        Fault("hub stopped", lambda: rig.stop_hub(), rig.start_hub),
        Fault("hub kill -9", lambda: rig.stop_hub(kill=True), rig.start_hub),
        Fault("undisturbed (middle)"),
        Fault("spoke stopped", lambda: rig.stop_spoke(spoke), lambda: rig.start_spoke(spoke)),
        Fault("spoke kill -9", lambda: rig.stop_spoke(spoke, kill=True),
              lambda: rig.start_spoke(spoke)),
        Fault("broker stopped", lambda: rig.stop_broker(), rig.start_broker),
        Fault("broker kill -9", lambda: rig.stop_broker(kill=True), rig.start_broker),
        Fault("container killed + retry", lambda: _kill_a_container(rig), None, retry=True),
        Fault("undisturbed (last)"),
    ]


def _kill_a_container(rig: FaultRig) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        case = rig.kill_container()
        if case:
            return case
        time.sleep(0.2)
    raise RuntimeError("no running container to kill")


def run(rig: FaultRig, fault: Fault, cases: int, downtime: float) -> tuple[float, float | None]:
    """(seconds for the whole study, seconds from restart until results flow again)."""
    began = time.perf_counter()
    recovery = None
    experiment_id = rig.launch(ARGUMENTS, max_cases=rig.cases_per_spoke)
    if fault.inject is not None:
        rig.wait_succeeded(experiment_id, max(1, cases // 3))
        fault.inject()
        if fault.restore is not None:
            time.sleep(downtime)
            restarted = time.perf_counter()
            fault.restore()
            done = rig.succeeded(experiment_id)
            if done < cases:
                rig.wait_succeeded(experiment_id, done + 1, timeout=900)
            recovery = time.perf_counter() - restarted
    rig.wait_completed(experiment_id, timeout=900)
    if fault.retry:
        rig.retry_failed(experiment_id, timeout=900)
    elapsed = time.perf_counter() - began
    problems = rig.check_exactly_once(experiment_id, cases)
    if problems:
        raise AssertionError(f"{fault.name}: {problems}")
    return elapsed, recovery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=12, help="cases per spoke")
    parser.add_argument("--spokes", type=int, default=3)
    parser.add_argument("--downtime", type=float, default=3.0,
                        help="seconds a stopped component stays down")
    args = parser.parse_args()
    settings = ServiceSettings()
    services.up(settings)
    image = build_and_push(ROOT / "tests" / "algorithms" / "misbehaving", "misbehaving",
                           "1.0.0", settings)
    root = Path(tempfile.mkdtemp(prefix="tributary-bench-recovery-"))
    rig = FaultRig(root, settings, image, spokes=args.spokes, cases_per_spoke=args.cases)
    cases = args.spokes * args.cases
    results: list[tuple[str, float, float | None]] = []
    try:
        rig.start()
        for fault in faults(rig):
            seconds, recovery = run(rig, fault, cases, args.downtime)
            results.append((fault.name, seconds, recovery))
            console.print(f"{fault.name:<26} {seconds:7.1f} s")
    finally:
        rig.close()
        shutil.rmtree(root, ignore_errors=True)
    undisturbed = [s for name, s, _ in results if name.startswith("undisturbed")]
    baseline = statistics.mean(undisturbed)
    table = Table(title=f"Study of {cases} cases on {args.spokes} spokes; component down "
                        f"{args.downtime:.0f} s; undisturbed {min(undisturbed):.1f} to "
                        f"{max(undisturbed):.1f} s")
    for column in ("fault", "study s", "ratio", "recovery s", "study time"):
        table.add_column(column, justify="left" if column in ("fault", "study time")
                         else "right")
    counted = [r for r in results if not r[0].startswith("warm-up")]
    widest = max(s for _, s, _ in counted)
    for name, seconds, recovery in counted:
        table.add_row(name, f"{seconds:.1f}", f"{seconds / baseline:.2f}",
                      "-" if recovery is None else f"{recovery:.1f}",
                      "█" * max(1, round(24 * seconds / widest)))
    console.print(table)
    console.print("every run: exactly one accepted result per case, none lost")


if __name__ == "__main__":
    main()
