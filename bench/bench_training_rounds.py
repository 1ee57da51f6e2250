"""A federated training round's wall time against the same local training run bare in
``docker run``, and SecAgg+ against plain aggregation, through the real broker, object store
(a SeaweedFS of the bench's own, via boto3) and Docker engine.

For each model size (10^4, 10^6, 10^7 float32 parameters) and number of simulated spokes
(3, 10, 20): one round of a training study, the hub's round loop
(``TrainingCoordinator``) and ``n`` spokes' training agents (``TrainingAgent`` with the
spoke's ``DockerTrainer``) in this process, every message signed and sent through the
broker, the global model and the masked updates through the store, each spoke's training
run a container of ``bench/algorithms/sized_training`` (a model of the given size, one
cheap step) on the same small synthetic cohort. The baselines, in the same run: that very
training run (same image, data, model) as one bare ``docker run`` with the same sandbox
flags, its folder prepared beforehand and not timed (median of runs before and after the
round), and ``n`` such runs started at once (the round's ``n`` containers share this
machine's cores too).

The round's time is broken down by wrapping the real functions with timers (each is still
called): per spoke, the model download (get, digest, decode), the container run, the
files around it (global model written, update read back), clip / noise / quantise,
SecAgg+ masking, the other SecAgg+ stages (keys, shares, signature, unmask shares), the
sealed journal, the upload; at the hub, reading the masked vectors, unmasking and summing,
writing the next global model. ``other`` is what is left of the wall time (broker
round-trips, the hub's database and polling, threads waiting for the 2 cores). The spokes
share this process and its cores, so their wall times grow with their number; the CPU time
of each spoke's own thread outside its container is what a site would pay, and is printed
too (it should not grow with the number of spokes, save SecAgg+'s log n neighbours).

Plain aggregation, in the same run and on the same store: each spoke clips, noises and
uploads its update as float32 (no quantisation, no masking, no SecAgg+ stages), and the hub
reads and sums them. ``secagg/plain`` compares the hub's aggregation (read + unmask + sum
against read + sum) and the spoke's protection and upload.

    .venv/bin/python bench/bench_training_rounds.py            # 1e4, 1e6, 1e7 x 3, 10, 20
    .venv/bin/python bench/bench_training_rounds.py --quick    # 1e4 x 3 spokes
    .venv/bin/python bench/bench_training_rounds.py --sizes 1e6 --spokes 3 10 --plot out.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from sqlmodel import Session

from tributary import services
from tributary.hub.db import make_engine
from tributary.hub.models import Algorithm, utcnow
from tributary.hub.services import training
from tributary.hub.training_coordinator import TrainingCoordinator
from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.objects import ObjectStore, round_update_key
from tributary.protocol.release import sign_approval
from tributary.protocol.signing import SigningKey
from tributary.protocol.training import secagg
from tributary.protocol.training.update import add_gaussian_noise, clip_l2, flatten, schema_of
from tributary.services import objectstore
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port
from tributary.spoke import training as spoke_training
from tributary.spoke.training_agent import DockerTrainer, TrainingAgent
from tributary.testbed.federation import generate_cohort
from tributary.testbed.training_demo import site_of
from tributary_algorithm.contract import (
    COHORT_PATH,
    CONTRACT_VERSION,
    GLOBAL_MODEL_PATH,
    MODEL_DIR,
    OUTPUT_DIR,
    OUTPUT_PATH,
    PARAMETERS_PATH,
    ROUND_PATH,
    TRAINING_CONTRACT_VERSION,
)
from tributary_algorithm.tensors import write_tensors
from tributary_algorithm.tools import build_image, localtrain
from tributary_algorithm.tools.localrun import run_sandboxed
from tributary_algorithm.tools.localtrain import cohort_json
from tributary_algorithm.training import RoundConfig

ROOT = Path(__file__).resolve().parent
ALGORITHM = ROOT / "algorithms" / "sized_training"
TAG = "tributary-bench/sized-training:latest"
BASE_IMAGE = "tributary/python-base:3.11"
STORE_HOST = "127.0.0.2"
HUB = "hub-training"
CLIP, NOISE = 1.0, 1.0
RUN = {"timeout": 900, "memory_mb": 1536}
#: Spoke-side components, in the order of a round.
SPOKE_PARTS = ("download", "container", "model files", "clip+noise+quantise", "mask",
               "secagg stages", "journal", "upload")
HUB_PARTS = ("read masked", "unmask+sum", "write model")
console = Console(width=160)


class Timers:
    """Seconds spent in each wrapped function, per thread (a spoke's worker thread is
    named after it, the hub's round loop is the caller's thread): wall time, and the
    thread's own CPU time (what a spoke would spend on a machine of its own)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spent: dict[tuple[str, str], float] = defaultdict(float)
        self.cpu: dict[tuple[str, str], float] = defaultdict(float)

    def add(self, part: str, seconds: float, cpu: float = 0.0) -> None:
        with self.lock:
            self.spent[(threading.current_thread().name, part)] += seconds
            self.cpu[(threading.current_thread().name, part)] += cpu

    @contextmanager
    def timing(self, part: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - start, time.thread_time() - cpu)

    def wrap(self, owner: Any, name: str, part: str) -> Callable[[], None]:
        """Time every call of ``owner.name`` as ``part``; returns the undo."""
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.timing(part):
                return original(*args, **kwargs)

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)

    def per_spoke(self, part: str, cpu: bool = False) -> list[float]:
        return [s for (thread, p), s in (self.cpu if cpu else self.spent).items()
                if p == part and thread.startswith("training-")]

    def hub(self, part: str) -> float:
        return sum(s for (thread, p), s in self.spent.items()
                   if p == part and not thread.startswith("training-"))


def instrument(timers: Timers) -> list[Callable[[], None]]:
    """Wrap the functions a round spends its time in (they still run)."""
    undo = [
        timers.wrap(spoke_training, "clip_l2", "clip+noise+quantise"),
        timers.wrap(spoke_training, "add_gaussian_noise", "clip+noise+quantise"),
        timers.wrap(spoke_training, "quantise", "clip+noise+quantise"),
        timers.wrap(secagg.SecAggClient, "mask", "mask"),
        timers.wrap(secagg.SecAggServer, "aggregate", "unmask+sum"),
    ]
    for stage in ("share_keys", "receive_shares", "sign_survivors", "unmask"):
        undo.append(timers.wrap(secagg.SecAggClient, stage, "secagg stages"))
    original = localtrain.run_training_task

    def run_task(*args: Any, **kwargs: Any) -> Any:
        start, cpu = time.perf_counter(), time.thread_time()
        result = original(*args, **kwargs)
        took, cpu = time.perf_counter() - start, time.thread_time() - cpu
        timers.add("container", result.duration_s)  # its CPU is the container's, not ours
        timers.add("model files", took - result.duration_s, cpu)
        return result

    localtrain.run_training_task = run_task  # DockerTrainer imports it at each call
    undo.append(lambda: setattr(localtrain, "run_training_task", original))
    return undo


class TimedAgent(TrainingAgent):
    """The spoke's training agent, its store and journal I/O timed."""

    timers: Timers

    def _global_model(self, message: Any) -> dict[str, np.ndarray]:
        with self.timers.timing("download"):
            return super()._global_model(message)

    def _upload(self, location: str, data: bytes) -> Any:
        with self.timers.timing("upload"):
            return super()._upload(location, data)

    def _save(self) -> None:
        with self.timers.timing("journal"):
            super()._save()


class TimedCoordinator(TrainingCoordinator):
    """The hub's round loop; notes when its first pass began (after the initial model is
    stored) and times each next global model's write."""

    timers: Timers
    began: float | None = None

    def step(self, study_id: str) -> bool:
        if self.began is None:
            self.began = time.perf_counter()
        return super().step(study_id)

    def put_model(self, round_index: int, study_id: str, params: Any) -> Any:
        if round_index == 0:
            return super().put_model(round_index, study_id, params)
        with self.timers.timing("write model"):
            return super().put_model(round_index, study_id, params)


@dataclass
class Setup:
    """What every configuration shares: services, store, image, cohort."""

    work: Path
    settings: ServiceSettings
    store: ServiceSettings
    image: str
    site: Any
    spoke_names: list[str]
    keys: dict[str, SigningKey] = field(default_factory=dict)

    def store_for(self, party: str) -> ObjectStore:
        return ObjectStore.from_file(objectstore.write_party_credentials(self.store, party))


def model_of(size: int) -> dict[str, np.ndarray]:
    """A float32 model of ``size`` parameters in two tensors (a weight matrix, a bias)."""
    bias = min(1000, size // 10)
    rng = np.random.default_rng(size)
    return {"bias": rng.standard_normal(bias).astype(np.float32),
            "weights": rng.standard_normal(size - bias).astype(np.float32)}


def bare_run(setup: Setup, params: dict[str, np.ndarray], folder: Path) -> float:
    """The training run as one bare ``docker run`` (the spoke's sandbox flags, the contract's
    mounts); the folder is prepared beforehand and not timed. Seconds."""
    folder.mkdir(parents=True)
    cohort, series_mounts = cohort_json(setup.site)
    (folder / "cohort.json").write_text(json.dumps(cohort, indent=1))
    model, out = folder / "model", folder / "output"
    model.mkdir()
    out.mkdir()
    config = RoundConfig(round=1, task="fit", study_id="bare", seed=7)
    (model / "round.json").write_text(json.dumps(config.to_json()))
    write_tensors(model / "global.safetensors", params)
    for path in (folder / "cohort.json", model / "round.json", model / "global.safetensors"):
        os.chmod(path, 0o644)
    os.chmod(model, 0o755)
    os.chmod(out, 0o777)
    algo_arg = {"contract_version": CONTRACT_VERSION,
                "training_contract_version": TRAINING_CONTRACT_VERSION, "arguments": {},
                "cohort": COHORT_PATH, "round": ROUND_PATH, "model": GLOBAL_MODEL_PATH,
                "output": OUTPUT_PATH, "parameters": PARAMETERS_PATH}
    mounts = [(folder / "cohort.json", COHORT_PATH, True), (model, MODEL_DIR, True),
              *((host, target, True) for host, target in series_mounts),
              (out, OUTPUT_DIR, False)]
    name = f"bench-bare-{uuid.uuid4().hex[:10]}"
    start = time.perf_counter()
    run = run_sandboxed(setup.image, mounts, json.dumps(algo_arg), folder, name=name,
                        timeout=RUN["timeout"], memory_mb=RUN["memory_mb"])
    took = time.perf_counter() - start
    subprocess.run(["docker", "rm", "--force", name], capture_output=True, check=False)
    if run.exit_code != 0 or not (out / "parameters.safetensors").exists():
        raise RuntimeError(f"the bare run failed: exit {run.exit_code}\n{run.stderr[-2000:]}")
    return took


def bare_together(setup: Setup, params: dict[str, np.ndarray], n: int, folder: Path) -> float:
    """``n`` bare runs at once, as the round's ``n`` spokes run on this machine's cores:
    the wall time until the last one ends. Seconds."""
    threads = [threading.Thread(target=bare_run, args=(setup, params, folder / str(i)))
               for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def training_round(setup: Setup, size: int, n: int) -> dict[str, Any]:
    """One round of a study on ``n`` spokes; its wall time and its parts."""
    names = setup.spoke_names[:n]
    timers = Timers()
    federation = f"tb{uuid.uuid4().hex[:8]}"
    broker = BrokerSettings(host=setup.settings.host, port=setup.settings.broker_port,
                            federation=federation)
    engine = make_engine(f"sqlite:///{setup.work / f'hub-{federation}.db'}")
    hub_key = SigningKey.generate()
    hub_store = setup.store_for("hub")
    clients = [StompClient(broker, HUB).start(wait=30)]
    coordinator = TimedCoordinator(engine, clients[0], hub_store, hub_key,
                                   {s: setup.keys[s].public for s in names}, federation)
    coordinator.timers = timers
    read = hub_store.get

    def timed_get(key: str) -> bytes:
        if not key.startswith("global/"):
            with timers.timing("read masked"):
                return read(key)
        return read(key)

    hub_store.get = timed_get  # type: ignore[method-assign]
    agents: list[TimedAgent] = []
    journals = setup.work / federation
    journals.mkdir()
    undo = instrument(timers)
    try:
        coordinator.start()
        for s in names:
            client = StompClient(broker, f"{s}-training").start(wait=30)
            clients.append(client)
            agent = TimedAgent(s, client, setup.store_for(s), setup.keys[s], hub_key.public,
                               DockerTrainer(setup.image, setup.site, RUN), federation,
                               journals / f"{s}.journal", os.urandom(32))
            agent.timers = timers
            agent.start()
            agents.append(agent)
        with Session(engine) as session:
            # The study names a registered, approved version, as on a real hub; the bench's
            # agents run the local image themselves (DockerTrainer), not admission.
            algorithm = Algorithm(
                name="sized-training", version=str(size), repository="bench.local/sized",
                digest=setup.image, approval=sign_approval(hub_key, "bench.local/sized",
                                                           setup.image, {}),
                approved_at=utcnow())
            session.add(algorithm)
            session.flush()
            study = training.launch(session, training.StudySpec(
                name="bench", algorithm_id=algorithm.id, spokes=names, rounds=1,
                min_participants=n, round_deadline_s=1800, max_attempts=1,
                clip_bound=CLIP, noise_multiplier=NOISE, epsilon_budget=1e12, delta=1e-5,
                initial_model="sha256:" + "0" * 64), "bench")
            session.commit()
            study_id = study.id
        final, _ = coordinator.run(study_id, model_of(size), poll_s=0.05, timeout_s=3600)
        wall = time.perf_counter() - (coordinator.began or 0.0)
        if final.state != "finished":
            raise RuntimeError(f"the round did not finish: {final.state} {final.stop_reason} "
                               f"{coordinator.refused} {[a.refused for a in agents]}")
    finally:
        for undo_one in undo:
            undo_one()
        for agent in agents:
            agent.stop()
        for client in clients:
            client.close()
        engine.dispose()
        shutil.rmtree(journals, ignore_errors=True)
    spoke = {part: statistics.mean(timers.per_spoke(part) or [0.0]) for part in SPOKE_PARTS}
    spoke_cpu = {part: statistics.mean(timers.per_spoke(part, cpu=True) or [0.0])
                 for part in SPOKE_PARTS if part != "container"}
    hub = {part: timers.hub(part) for part in HUB_PARTS}
    slowest = max(sum(s for (thread, _p), s in timers.spent.items() if thread == f"training-{a}")
                  for a in names)
    return {"wall": wall, "spoke": spoke, "spoke_cpu": spoke_cpu, "hub": hub,
            "other": max(0.0, wall - slowest - sum(hub.values())), "round_index": 0}


def plain_aggregation(setup: Setup, size: int, n: int) -> dict[str, float]:
    """The same updates without SecAgg+: each spoke (a thread each, as in a round) clips,
    noises and uploads float32 to its own object; the hub reads and sums them. Seconds:
    mean per spoke, and the hub's."""
    params = model_of(size)
    schema = schema_of(params)
    names = setup.spoke_names[:n]
    spent: dict[str, float] = {}
    key = f"plain-{uuid.uuid4().hex[:8]}.bin"

    def spoke(s: str) -> None:
        store = setup.store_for(s)
        update = flatten(params, schema) * 0.01
        start = time.perf_counter()
        clipped, _ = clip_l2(update, CLIP)
        data = add_gaussian_noise(clipped, NOISE * CLIP).astype("<f4").tobytes()
        store.put(round_update_key(s, 0, key), data)
        spent[s] = time.perf_counter() - start

    threads = [threading.Thread(target=spoke, args=(s,)) for s in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hub_store = setup.store_for("hub")
    start = time.perf_counter()
    total = np.zeros(schema.size, dtype=np.float64)
    for s in names:
        total += np.frombuffer(hub_store.get(round_update_key(s, 0, key)), dtype="<f4")
    hub = time.perf_counter() - start
    return {"spoke": statistics.mean(spent.values()), "hub": hub}


def prepare(work: Path, store: ServiceSettings, spokes: int) -> Setup:
    settings = ServiceSettings()
    services.up(settings)
    names = [f"bench-{i:02d}" for i in range(spokes)]
    objectstore.write_identities(store, names, federation="training-bench")
    objectstore.ensure_running(store)
    console.print("building the bench's training image (offline, from wheels)...")
    build_image(ALGORITHM, TAG, base_image=BASE_IMAGE)
    image = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", TAG],
                           check=True, capture_output=True, text=True).stdout.strip()
    generate_cohort(work / "cohort", 4, seed=11, site="Bench", size=64, slices=16)
    setup = Setup(work, settings, store, image, site_of(work / "cohort"), names)
    setup.keys = {s: SigningKey.generate() for s in names}
    return setup


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for size in sorted({r["size"] for r in rows}):
        mine = [r for r in rows if r["size"] == size]
        ns = [r["n"] for r in mine]
        line = left.plot(ns, [r["wall"] / r["bare"] for r in mine], "o-",
                         label=f"{size:.0e}: against one bare run")[0]
        left.plot(ns, [r["wall"] / r["bare_together"] for r in mine], "o--",
                  color=line.get_color(), label=f"{size:.0e}: against n bare runs at once")
        line = right.plot(ns, [sum(r["spoke"].values()) for r in mine], "o-",
                          label=f"{size:.0e}: wall time")[0]
        right.plot(ns, [sum(r["spoke_cpu"].values()) for r in mine], "o--",
                   color=line.get_color(), label=f"{size:.0e}: CPU outside the container")
    left.set(xlabel="spokes", ylabel="round wall time / bare docker run",
             title="Round overhead")
    right.set(xlabel="spokes", ylabel="seconds per spoke (mean)", title="Work per spoke")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^4 parameters, 3 spokes")
    parser.add_argument("--sizes", nargs="+", type=float, default=None)
    parser.add_argument("--spokes", nargs="+", type=int, default=None)
    parser.add_argument("--bare-runs", type=int, default=2,
                        help="bare runs before and after each round (their median)")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG here")
    parser.add_argument("--json", type=Path, default=None,
                        help="append each configuration's figures here (JSON lines)")
    parser.add_argument("--tables", type=Path, default=None,
                        help="print the tables (and --plot) of a --json file; run nothing")
    args = parser.parse_args()
    if args.tables:
        rows = [json.loads(line) for line in args.tables.read_text().splitlines() if line]
        summary(rows)
        if args.plot:
            plot(rows, args.plot)
        return
    sizes = [int(s) for s in args.sizes or ([1e4] if args.quick else [1e4, 1e6, 1e7])]
    counts = args.spokes or ([3] if args.quick else [3, 10, 20])
    logging.getLogger("tributary").setLevel(logging.ERROR)
    rows: list[dict[str, Any]] = []
    # SIGTERM unwinds like Ctrl-C: the bench's own object store is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        store = ServiceSettings(state_dir=Path(tmp) / "objectstore", host=STORE_HOST,
                                objectstore_port=free_port(STORE_HOST))
        try:
            setup = prepare(Path(tmp), store, max(counts))
            for size in sizes:
                params = model_of(size)
                bare_run(setup, params, Path(tmp) / f"warm-{size}")  # page cache, image
                for n in counts:
                    # Bare runs on both sides of the round: the machine's load drifts.
                    bares = [bare_run(setup, params, Path(tmp) / f"bare-{size}-{n}-{i}")
                             for i in range(args.bare_runs)]
                    result = training_round(setup, size, n)
                    plain = plain_aggregation(setup, size, n)
                    bares += [bare_run(setup, params, Path(tmp) / f"bare-{size}-{n}-after-{i}")
                              for i in range(args.bare_runs)]
                    together = bare_together(setup, params, n, Path(tmp) / f"together-{size}-{n}")
                    row = {"size": size, "n": n, "bare": statistics.median(bares),
                           "bare_together": together, **result, "plain": plain}
                    rows.append(row)
                    report_row(row)
                    if args.json:
                        with args.json.open("a") as out:
                            out.write(json.dumps(row) + "\n")
        finally:
            objectstore.stop(store)
    summary(rows)
    if args.plot:
        plot(rows, args.plot)
        console.print(f"plot written to {args.plot}")


def secagg_costs(r: dict[str, Any]) -> tuple[float, float]:
    """(spoke, hub) seconds of the SecAgg+ path that plain aggregation replaces."""
    spoke, hub = r["spoke"], r["hub"]
    return (spoke["clip+noise+quantise"] + spoke["mask"] + spoke["secagg stages"]
            + spoke["upload"], hub["read masked"] + hub["unmask+sum"])


def report_row(r: dict[str, Any]) -> None:
    spoke_s, hub_s = secagg_costs(r)
    console.print(
        f"{r['size']:.0e} params, {r['n']} spokes: round {r['wall']:.2f} s, bare docker run "
        f"{r['bare']:.2f} s ({r['wall'] / r['bare']:.2f}x), {r['n']} at once "
        f"{r['bare_together']:.2f} s ({r['wall'] / r['bare_together']:.2f}x); per spoke "
        f"{sum(r['spoke'].values()):.2f} s (container {r['spoke']['container']:.2f} s); "
        f"hub {sum(r['hub'].values()):.2f} s; SecAgg+/plain: spoke "
        f"{spoke_s / r['plain']['spoke']:.1f}x, hub {hub_s / r['plain']['hub']:.1f}x",
        highlight=False)


def summary(rows: list[dict[str, Any]]) -> None:
    ms = "{:.0f}".format
    table = Table("params", "spokes", "bare s", "round s", "round/bare", "n bare at once s",
                  "round/n at once", "container s", "rest per spoke s", "hub s", "other s",
                  title="A round against the same training bare in docker run")
    for r in rows:
        c = r["spoke"]["container"]
        table.add_row(f"{r['size']:.0e}", str(r["n"]), f"{r['bare']:.2f}", f"{r['wall']:.2f}",
                      f"{r['wall'] / r['bare']:.2f}x", f"{r['bare_together']:.2f}",
                      f"{r['wall'] / r['bare_together']:.2f}x", f"{c:.2f}",
                      f"{sum(r['spoke'].values()) - c:.2f}", f"{sum(r['hub'].values()):.2f}",
                      f"{r['other']:.2f}")
    console.print(table)
    table = Table("params", "spokes", *SPOKE_PARTS, "total", *(f"hub {p}" for p in HUB_PARTS),
                  title="Where the time goes, ms (spoke columns: mean per spoke)")
    for r in rows:
        table.add_row(f"{r['size']:.0e}", str(r["n"]),
                      *(ms(r["spoke"][p] * 1e3) for p in SPOKE_PARTS),
                      ms(sum(r["spoke"].values()) * 1e3),
                      *(ms(r["hub"][p] * 1e3) for p in HUB_PARTS))
    console.print(table)
    cpu_parts = [p for p in SPOKE_PARTS if p != "container"]
    table = Table("params", "spokes", *cpu_parts, "total",
                  title="CPU time per spoke outside its container, ms (mean; flat as spokes "
                        "grow if a spoke's cost does not depend on their number)")
    for r in rows:
        table.add_row(f"{r['size']:.0e}", str(r["n"]),
                      *(ms(r["spoke_cpu"][p] * 1e3) for p in cpu_parts),
                      ms(sum(r["spoke_cpu"].values()) * 1e3))
    console.print(table)
    table = Table("params", "spokes", "spoke plain", "spoke SecAgg+", "ratio", "hub plain",
                  "hub SecAgg+", "ratio",
                  title="SecAgg+ against plain aggregation, ms (spoke: mean per spoke)")
    for r in rows:
        spoke_s, hub_s = secagg_costs(r)
        plain = r["plain"]
        table.add_row(f"{r['size']:.0e}", str(r["n"]), ms(plain["spoke"] * 1e3),
                      ms(spoke_s * 1e3), f"{spoke_s / plain['spoke']:.1f}x",
                      ms(plain["hub"] * 1e3), ms(hub_s * 1e3),
                      f"{hub_s / plain['hub']:.1f}x")
    console.print(table)
    console.print(
        "round: from the hub's first pass to the next global model stored. bare: one docker "
        "run of the same training (image, data, model), median of the runs before and after "
        "the round. n bare at once: n such runs started together (the round's n spokes share "
        "this machine's cores), until the last ends. container: a spoke's docker run inside "
        "the round; rest per spoke: the spoke's other timed work. other: the "
        "round's wall time less the slowest spoke's timed work and the hub's (broker "
        "round-trips, the hub's database and polling, waiting for a core). SecAgg+: spoke "
        "clip+noise+quantise+mask+other stages+upload, hub read+unmask+sum; plain: spoke "
        "clip+noise+upload of float32, hub read+sum.", highlight=False)


if __name__ == "__main__":
    main()
