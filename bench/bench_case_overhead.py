"""Per-case orchestration: what the spoke spends on a case beyond running its container,
against a bare ``docker run --rm --network none`` of the same image with the same mounts,
flags and limits, in the same run.

The spoke side is the spoke's own case worker (``CaseExecution.run`` of a real agent
object, not connected to a broker): the journal claim, the input digest, the participant
file, the output folder's quota, the container's create/start/wait/inspect/remove, the
output read, the signed result in the custody chain and the outbox, and the audit log.
The bare side is one ``docker run`` command of the same case's participant file, input
series and output folder (prepared beforehand, not timed). The two alternate, each pair
in a random order, after a warm-up; the ratio is of the medians.

Two kinds of case: trivial (the misbehaving test algorithm's ``ok``: start, read the
participant file, write output.json) and CPU-bound (``spin``: the same image busy for
``--cpu-seconds``).

    .venv/bin/python bench/bench_case_overhead.py [--pairs 20] [--cpu-pairs 5] [--engine docker]

The last line reads ``case overhead: Tx trivial (+M ms a case), Cx CPU-bound``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tributary import services
from tributary.protocol.contract import ALGO_ARG_ENV, OUTPUT_DIR, PARTICIPANT_PATH, AlgoArg
from tributary.protocol.messages import (
    AlgorithmRef,
    CohortSelection,
    ExperimentMessage,
    ExperimentState,
    RunLimits,
)
from tributary.protocol.signing import SigningKey
from tributary.services import podman
from tributary.services.settings import ServiceSettings
from tributary.spoke import journal as states
from tributary.spoke.agent import SpokeAgent
from tributary.spoke.config import ExecutionSettings, RunnerSettings, SpokeConfig
from tributary.spoke.liveness import CaseActivity
from tributary.spoke.runner import ALGORITHM_USER
from tributary.testbed.federation import build_and_push, generate_cohort

ROOT = Path(__file__).resolve().parents[1]
LIMITS = RunLimits(timeout_seconds=600, memory_mb=512, cpus=1.0)
console = Console(width=110)


def spoke(work: Path, data: Path, services_settings: ServiceSettings,
          engine: str) -> SpokeAgent:
    hub_key = work / "hub.key"
    SigningKey.load_or_create(hub_key)
    execution = ExecutionSettings(engine=engine)  # type: ignore[arg-type]
    if engine == "podman":
        execution = ExecutionSettings(engine="podman",
                                      podman_socket=podman.ensure_running(services_settings))
    config = SpokeConfig(
        spoke_id="bench-overhead", data_dir=data, work_dir=work / "spoke",
        hub_public_key=Path(f"{hub_key}.pub"), concurrency=1,
        runner=RunnerSettings(allowed_registries=[services_settings.registry]),
        execution=execution)
    agent = SpokeAgent(config)
    agent.execution.progress.report = lambda *args, **kwargs: None  # type: ignore[method-assign]
    return agent


def experiment(agent: SpokeAgent, image: tuple[str, str], arguments: dict[str, Any],
               name: str, cases: int) -> ExperimentMessage:
    """An accepted experiment of ``cases`` cases of the spoke's catalog, queued in its
    journal."""
    repository, digest = image
    message = ExperimentMessage(
        experiment_id=f"bench-{name}-{os.urandom(3).hex()}", spoke_id=agent.config.spoke_id,
        algorithm=AlgorithmRef(name="misbehaving", version="1", repository=repository,
                               digest=digest),
        arguments=arguments, limits=LIMITS, cohort=CohortSelection(max_cases=cases))
    agent.journal.add_experiment(message)
    ids = list(agent.execution.cases.select(message))
    agent.lifecycle.settle(message.experiment_id, states.ACCEPTED, ExperimentState.ACCEPTED,
                           ids, queue=ids, expect=states.RECEIVED)
    return message


def spoke_case(agent: SpokeAgent, message: ExperimentMessage) -> float:
    """One queued case through the spoke's case worker; seconds."""
    began = time.perf_counter()
    row = agent.journal.claim_next()
    assert row is not None, "no case left in the queue"
    activity = CaseActivity(row.experiment_id, row.case_id, row.attempt, datetime.now(UTC))
    agent.execution.run(message, row, activity)
    took = time.perf_counter() - began
    result = agent.journal.result(row.experiment_id, row.case_id, row.attempt)
    assert result is not None and result.status == "succeeded", (
        row, result, agent.journal.cases(row.experiment_id))
    return took


def bare_case(agent: SpokeAgent, message: ExperimentMessage, folder: Path) -> float:
    """The same case as one bare ``docker run --rm``; seconds (preparation not timed)."""
    case = next(iter(agent.execution.cases.cohort(message).values()))
    prepared = agent.execution.cases.input(message.experiment_id, case)
    if folder.exists():
        shutil.rmtree(folder)
    out = folder / "output"
    out.mkdir(parents=True)
    os.chown(out, 65534, 65534)
    participant = folder / "participant.json"
    participant.write_text(prepared.participant.model_dump_json(indent=2))
    participant.chmod(0o644)
    runner = agent.config.runner
    command = [
        "docker", "run", "--rm", "--network", "none", "--read-only", "--user", ALGORITHM_USER,
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--pids-limit", str(runner.pids_limit), "--memory", f"{LIMITS.memory_mb}m",
        "--memory-swap", f"{LIMITS.memory_mb}m", "--cpus", str(LIMITS.cpus),
        "--tmpfs", f"/tmp:rw,noexec,nosuid,size={runner.tmpfs_mb}m", "--workdir", "/tmp",
        "--env", f"{ALGO_ARG_ENV}={AlgoArg(arguments=message.arguments).model_dump_json()}",
        "--volume", f"{participant}:{PARTICIPANT_PATH}:ro",
        "--volume", f"{out}:{OUTPUT_DIR}:rw",
        *(a for path, host in prepared.mounts.items() for a in ("--volume", f"{host}:{path}:ro")),
        message.algorithm.reference]
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    took = time.perf_counter() - began
    assert (out / "output.json").exists(), "the bare run wrote no output"
    return took


def measure(agent: SpokeAgent, message: ExperimentMessage, pairs: int,
            scratch: Path) -> tuple[list[float], list[float]]:
    spoke_times: list[float] = []
    bare_times: list[float] = []
    spoke_case(agent, message)  # warm-up: image, page cache, first container
    bare_case(agent, message, scratch)
    for _ in range(pairs):
        order = [True, False]
        random.shuffle(order)
        for spoke_first in order:
            if spoke_first:
                spoke_times.append(spoke_case(agent, message))
            else:
                bare_times.append(bare_case(agent, message, scratch))
    return spoke_times, bare_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20, help="trivial cases per side")
    parser.add_argument("--cpu-pairs", type=int, default=5, help="CPU-bound cases per side")
    parser.add_argument("--cpu-seconds", type=float, default=3.0)
    parser.add_argument("--engine", choices=("docker", "podman"), default="docker",
                        help="the spoke's engine (the bare side is always docker run)")
    args = parser.parse_args()
    logging.getLogger("tributary.spoke.ingest").setLevel(logging.ERROR)  # its CSV and JSON
    settings = ServiceSettings()
    services.up(settings)
    image = build_and_push(ROOT / "tests" / "algorithms" / "misbehaving", "misbehaving",
                           "1.0.0", settings)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        root = Path(tmp)
        total = max(args.pairs, args.cpu_pairs) + 1
        generate_cohort(root / "data", total, seed=5, site="bench", size=64, slices=16)
        agent = spoke(root, root / "data", settings, args.engine)
        try:
            kinds = [("trivial", {"behaviour": "ok"}, args.pairs),
                     ("CPU-bound", {"behaviour": "spin", "seconds": args.cpu_seconds},
                      args.cpu_pairs)]
            for label, arguments, pairs in kinds:
                message = experiment(agent, image, arguments, label.lower()[:3], pairs + 1)
                spoke_times, bare_times = measure(agent, message, pairs, root / "bare")
                rows.append((label, statistics.median(spoke_times),
                             statistics.median(bare_times)))
        finally:
            agent.journal.close()
    table = Table("case", "spoke (median s)", "docker run (median s)", "ratio", "extra ms")
    for label, spoke_s, bare_s in rows:
        table.add_row(label, f"{spoke_s:.3f}", f"{bare_s:.3f}", f"{spoke_s / bare_s:.3f}x",
                      f"{(spoke_s - bare_s) * 1000:+.0f}")
    console.print(table)
    (_, ts, tb), (_, cs, cb) = rows
    console.print("target: at most 1.05x on trivial cases (before this work: 1.14 to 1.16x, "
                  "about 42 ms a case)")
    print(f"case overhead: {ts / tb:.3f}x trivial ({(ts - tb) * 1000:+.0f} ms a case), "
          f"{cs / cb:.3f}x CPU-bound")


if __name__ == "__main__":
    main()
