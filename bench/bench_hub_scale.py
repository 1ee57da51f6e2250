"""A hub under a large study, against baselines measured in the same run.

Simulated spokes (:mod:`tributary.testbed.simspoke`: real Ed25519 keys enrolled at a real
``tributary hub serve``, real custody chains, signed messages, no containers) read their
experiment message from the broker, accept a case list and publish one signed result per
case. Measured, each beside its baseline:

- raw broker: the project's stomp.py client publishing and consuming the same persistent
  messages on a scratch queue (the ceiling for anything through the broker);
- through the broker: results stored by the hub per second, end to end, per window;
- in-process: the same signed messages verified and fed to the hub's ingest function
  directly, in batches as the results consumer takes them, on a database of its own, per
  window;
- at each checkpoint (1,000 / 10,000 / 30,000 stored results by default): p95 of every
  page and endpoint beside ``/api/health`` (the hub's cheapest answer), hub CPU and memory,
  hub CPU milliseconds per result in the last window.

    .venv/bin/python bench/bench_hub_scale.py --quick          # under three minutes
    .venv/bin/python bench/bench_hub_scale.py                  # 200 spokes x 150 cases
    .venv/bin/python bench/bench_hub_scale.py --spokes 50 --cases-per-spoke 40 --max-seconds 600

Every phase stops at ``--max-seconds`` and reports the size it reached. Needs the local
services (``tributary services up``: ActiveMQ).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func
from sqlmodel import Session, select

from tributary import services
from tributary.hub import worker
from tributary.hub.db import make_engine, open_database
from tributary.hub.models import (
    Algorithm,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Spoke,
    SpokeKey,
    TargetState,
)
from tributary.hub.opening import EnvelopeOpener, Opened, PendingBatch
from tributary.hub.services import debounce
from tributary.hub.services.ingest import ingest_batch
from tributary.hub.settings import HubSettings
from tributary.hub.signin import TOKEN_COOKIE
from tributary.protocol.broker import BrokerSettings, Delivery, PublishError, StompClient
from tributary.protocol.destinations import results_queue
from tributary.protocol.messages import ExperimentState as SpokeState
from tributary.protocol.signing import PublicKey
from tributary.protocol.wire import open_from_spoke
from tributary.services import redis
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation
from tributary.testbed.simspoke import SimSpoke

DIGEST = "sha256:" + "5" * 64
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


class Study:
    """The signed messages of one study: per spoke an accepted status, a heartbeat, then
    one result per case (outputs for the ``summary`` aggregator)."""

    def __init__(self, experiment_id: str, spokes: list[SimSpoke], cases: int) -> None:
        self.experiment_id = experiment_id
        self.opening: list[str] = []
        self.results: list[str] = []
        per_spoke: list[list[str]] = []
        for spoke in spokes:
            case_ids = [f"{spoke.spoke_id}-c{i}" for i in range(cases)]
            self.opening.append(spoke.status(experiment_id, SpokeState.ACCEPTED, case_ids))
            self.opening.append(spoke.heartbeat(queue_depth=cases))
            per_spoke.append([spoke.result(experiment_id, case, DIGEST,
                                           {"volume": float(i % 97)})
                              for i, case in enumerate(case_ids)])
        # Round robin over spokes, as results of a running study arrive.
        for i in range(cases):
            self.results.extend(bodies[i] for bodies in per_spoke)


# -- baseline: the broker alone ----------------------------------------------------------
def raw_broker_rate(settings: BrokerSettings, bodies: list[str], budget: float) -> float:
    """Messages per second published (confirmed) and consumed (acknowledged) on a scratch
    queue, one message in flight at a time, as a spoke publishes and the hub consumes."""
    destination = f"/queue/bench.raw.{secrets.token_hex(4)}"
    publisher = StompClient(settings, "bench-raw-publisher").start(30)
    consumer = StompClient(settings, "bench-raw-consumer").start(30)
    consumed: queue.Queue[int] = queue.Queue()

    def handle(delivery: Delivery) -> None:
        consumer.ack(delivery)
        consumed.put(1)

    consumer.subscribe(destination, handle)
    sent, t0 = 0, time.perf_counter()
    try:
        for body in bodies:
            publisher.publish(destination, body)
            sent += 1
            if time.perf_counter() - t0 > budget:
                break
        for _ in range(sent):
            consumed.get(timeout=60)
        return sent / (time.perf_counter() - t0)
    finally:
        publisher.close()
        consumer.close()


def drain(settings: BrokerSettings, destination: str, idle: float = 3.0) -> int:
    """Consume and drop what the hub left on ``destination`` when a budget stopped it, so
    that the shared broker keeps nothing of this run."""
    client = StompClient(settings, "bench-drain").start(30)
    dropped: queue.Queue[int] = queue.Queue()

    def handle(delivery: Delivery) -> None:
        client.ack(delivery)
        dropped.put(1)

    client.subscribe(destination, handle)
    count = 0
    try:
        while True:
            dropped.get(timeout=idle)
            count += 1
    except queue.Empty:
        return count
    finally:
        client.close()


# -- the hub in-process ------------------------------------------------------------------
def in_process(experiment_id: str, spokes: list[SimSpoke], study: Study, checkpoints: list[int],
               budget: float) -> tuple[float, int, dict[int, float], dict[int, float]]:
    """Verify and ingest the study's messages on a fresh hub database (aggregation as the
    hub's default configuration runs it: Celery eager, the debouncer in a thread of its
    own, as in the hub process). Returns (overall rate, results reached, rate and CPU ms
    per result of the process over the window ending at each checkpoint)."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = HubSettings.for_directory(Path(tmp), signing_key=Path(tmp) / "hub.key",
                                             audit_log=Path(tmp) / "audit.jsonl")
        engine = open_database(settings)
        worker.configure(settings, engine)
        debouncer = debounce.start(settings, engine)
        keys = {spoke.key.keyid: (spoke.spoke_id, spoke.key.public) for spoke in spokes}
        table = {spoke.key.keyid: (spoke.spoke_id, spoke.key.public.pem) for spoke in spokes}
        opener = EnvelopeOpener(settings.results_verify_processes)
        with Session(engine) as session:
            session.add(Algorithm(id=1, name="bench", version="1", repository="bench/alg",
                                  digest=DIGEST, approval={"approved": True}))
            for spoke in spokes:
                session.add(Spoke(id=spoke.spoke_id, name=spoke.spoke_id))
            session.flush()
            for spoke in spokes:
                session.add(SpokeKey(keyid=spoke.key.keyid, spoke_id=spoke.spoke_id,
                                     public_key_pem=spoke.key.public.pem))
            session.add(Experiment(id=experiment_id, name="bench", algorithm_id=1,
                                   aggregator="summary", state=ExperimentState.LAUNCHED))
            session.flush()
            for spoke in spokes:
                session.add(ExperimentTarget(experiment_id=experiment_id,
                                             spoke_id=spoke.spoke_id,
                                             state=TargetState.PUBLISHED))
            session.commit()

        def feed(bodies: list[str]) -> None:
            """Open each envelope, store them together (the opening statuses)."""
            messages = [open_from_spoke(body, keys.get)[0] for body in bodies]
            with Session(engine) as session:
                outcomes = ingest_batch(session, messages)
            assert all(outcome is True for outcome in outcomes), outcomes

        def store(batch: PendingBatch) -> None:
            """Store a batch opened by the opener, as the results consumer does."""
            opened = batch.result()
            assert all(isinstance(item, Opened) for item in opened), opened
            with Session(engine) as session:
                outcomes = ingest_batch(session, [item.message for item in opened],  # type: ignore[union-attr]
                                        [item.custody for item in opened])  # type: ignore[union-attr]
            assert all(outcome is True for outcome in outcomes), outcomes

        t_open = time.perf_counter()
        for body in study.opening:
            feed([body])
        progress(f"in-process: {len(study.opening)} accepted statuses and heartbeats "
                 f"({len(study.results)} case rows) in {time.perf_counter() - t_open:.1f} s")
        opener.submit(study.opening[:1], table).result()  # its processes started, as a hub's
        rates: dict[int, float] = {}
        cpu: dict[int, float] = {}
        done, t0 = 0, time.perf_counter()
        def cpu_now() -> float:  # this process's threads and the verifying processes
            return time.process_time() + sum(tree_cpu(pid) for pid in opener.pids())

        window_start, window_done, window_cpu = t0, 0, cpu_now()
        window_thread = time.thread_time()  # the ingesting thread alone, not the debouncer
        pending = sorted(checkpoints)
        batch = settings.results_batch_size

        def batches() -> Iterator[PendingBatch]:
            """Batches of the consumer's size, cut at the checkpoints, each submitted to
            the opener; the consumer takes and opens the next batch while storing one."""
            start = 0
            while start < len(study.results):
                size = min(batch, len(study.results) - start,
                           *(c - start for c in pending if c > start))
                yield opener.submit(study.results[start:start + size], table)
                start += size

        taken = batches()
        current = next(taken, None)
        while current is not None:
            ahead = next(taken, None) if opener.parallel else None  # opens meanwhile
            size = len(current.result())
            store(current)
            current = ahead if opener.parallel else next(taken, None)
            before, done = done, done + size
            if done in pending:
                now, now_cpu = time.perf_counter(), cpu_now()
                rates[done] = (done - window_done) / (now - window_start)
                cpu[done] = (now_cpu - window_cpu) / (done - window_done) * 1000
                thread = (time.thread_time() - window_thread) / (done - window_done) * 1000
                window_start, window_done, window_cpu = now, done, now_cpu
                window_thread = time.thread_time()
                progress(f"in-process: {done} results, {rates[done]:.1f}/s, "
                         f"{cpu[done]:.2f} ms CPU a result in this window, of it "
                         f"{thread:.2f} in the ingesting thread")
            elif done // 1000 > before // 1000:
                progress(f"in-process: {done} results, "
                         f"{done / (time.perf_counter() - t0):.1f}/s so far")
            if time.perf_counter() - t0 > budget:
                progress(f"in-process: budget spent at {done} results")
                break
        elapsed = time.perf_counter() - t0
        overall = done / elapsed
        verifier_cpu = sum(tree_cpu(pid) for pid in opener.pids())
        opener.close()
        debouncer.stop()
        progress(f"in-process: {settings.results_verify_processes} verifying process(es) took "
                 f"{verifier_cpu:.1f} s of CPU")
        progress(f"in-process: the debouncer took {debouncer.cpu_seconds:.1f} s of CPU in "
                 f"{elapsed:.1f} s ({debouncer.cpu_seconds / elapsed:.2f} of a core)")
        engine.dispose()
    return overall, done, rates, cpu


# -- the hub through the broker ----------------------------------------------------------
PAGES = ["/", "/experiments/{id}", "/experiments/{id}/results", "/api/experiments",
         "/api/experiments/{id}", "/api/experiments/{id}/cases", "/api/spokes",
         "/api/experiments/{id}/aggregate"]
BASELINE_PAGE = "/api/health"


def sample_pages(federation: LocalFederation, experiment_id: str,
                 samples: int) -> dict[str, tuple[float, int]]:
    """p95 milliseconds and the size in bytes of each page, signed in as the administrator
    (the browser pages with the sign-in cookie holding the same token)."""
    figures: dict[str, tuple[float, int]] = {}
    with federation.api() as api:
        api.cookies.set(TOKEN_COOKIE, federation.admin_token)
        for page in [BASELINE_PAGE, *PAGES]:
            path = page.format(id=experiment_id)
            times, size = [], 0
            for _ in range(samples):
                t0 = time.perf_counter()
                response = api.get(path, timeout=300)
                times.append((time.perf_counter() - t0) * 1000)
                size = len(response.content)
                if response.status_code >= 400:
                    size = -response.status_code
            figures[page] = (p95(times), size)
            progress(f"{page}: p95 {figures[page][0]:.1f} ms, {size} bytes")
    return figures


def stored(engine: object, experiment_id: str) -> int:
    with Session(engine) as session:  # type: ignore[arg-type]
        return int(session.exec(select(func.count()).select_from(CaseResult).where(
            CaseResult.experiment_id == experiment_id,
            CaseResult.state == CaseState.SUCCEEDED)).one())


def rows(engine: object, experiment_id: str) -> int:
    """Case rows of the study, whatever their state (accepted case lists create them)."""
    with Session(engine) as session:  # type: ignore[arg-type]
        return int(session.exec(select(func.count()).select_from(CaseResult).where(
            CaseResult.experiment_id == experiment_id)).one())


def launch(federation: LocalFederation, spokes: list[SimSpoke]) -> str:
    """Enrol the simulated spokes and launch a study on all of them through the hub API."""
    with federation.api() as api:
        for spoke in spokes:
            api.post("/api/spokes", json={"id": spoke.spoke_id, "name": spoke.spoke_id,
                                          "institution": "simulated"}).raise_for_status()
            api.post(f"/api/spokes/{spoke.spoke_id}/keys",
                     json={"public_key_pem": spoke.key.public.pem}).raise_for_status()
    algorithm = federation.register_algorithm(name=f"bench-{secrets.token_hex(3)}",
                                              version="1", repository="bench/alg",
                                              digest=DIGEST)
    with federation.api() as api:
        experiment = api.post("/api/experiments", json={
            "name": "hub scale", "algorithm_id": algorithm["id"],
            "spoke_ids": [s.spoke_id for s in spokes]}).raise_for_status().json()
        api.post(f"/api/experiments/{experiment['id']}/launch").raise_for_status()
    return str(experiment["id"])


def through_broker(federation: LocalFederation, client: StompClient, study: Study,
                   checkpoints: list[int], budget: float,
                   at_checkpoint: Callable[[int, float], None]) -> tuple[float, int]:
    """Publish the results (a publisher thread) and time their storage by the hub; at each
    checkpoint publishing pauses while the pages are sampled."""
    engine = make_engine(f"sqlite:///{federation.hub_dir / 'hub.db'}", migrate=False)
    destination = results_queue(client.settings.federation)
    t_open = time.perf_counter()
    for body in study.opening:
        client.publish(destination, body)
    # Accepted case lists create the case rows today; should they stop doing so, waiting
    # ends once the count stays put for 20 s.
    seen, since = -1, time.perf_counter()
    while (count := rows(engine, study.experiment_id)) < len(study.results):
        if count != seen:
            seen, since = count, time.perf_counter()
        elif time.perf_counter() - since > 20:
            break
        if time.perf_counter() - t_open > budget:
            progress("through broker: budget spent before every case list was accepted")
            break
        time.sleep(0.5)
    progress(f"through broker: {len(study.opening)} accepted statuses and heartbeats "
             f"({rows(engine, study.experiment_id)} case rows) in "
             f"{time.perf_counter() - t_open:.1f} s")
    allowed = threading.Semaphore(0)
    stop = threading.Event()

    def publisher() -> None:
        for index, body in enumerate(study.results):
            if index in checkpoints_set:
                allowed.acquire()
            if stop.is_set():
                return
            try:
                client.publish(destination, body)
            except PublishError:
                return  # the run is over and the client closed

    checkpoints_set = set(checkpoints)
    thread = threading.Thread(target=publisher, daemon=True)
    t0 = time.perf_counter()
    spent = 0.0  # time spent sampling pages, not counted in the rate
    thread.start()
    reached, window_start, window_done, last_report = 0, t0, 0, t0
    pending = sorted(c for c in checkpoints if c <= len(study.results))
    try:
        while pending:
            reached = stored(engine, study.experiment_id)
            now = time.perf_counter()
            if reached >= pending[0]:
                pending.pop(0)
                rate = (reached - window_done) / (now - window_start)
                progress(f"through broker: {reached} stored, {rate:.1f}/s in this window")
                pause = time.perf_counter()
                at_checkpoint(reached, rate)
                spent += time.perf_counter() - pause
                window_start, window_done = time.perf_counter(), reached
                allowed.release()
                continue
            if now - last_report > 15:
                last_report = now
                progress(f"through broker: {reached} stored, "
                         f"{(reached - window_done) / (now - window_start):.1f}/s in this window")
            if now - t0 - spent > budget:
                progress(f"through broker: budget spent at {reached} stored results")
                if reached > window_done:
                    pause = time.perf_counter()
                    at_checkpoint(reached, (reached - window_done) / (now - window_start))
                    spent += time.perf_counter() - pause
                break
            time.sleep(0.5)
    finally:
        stop.set()
        for _ in range(len(checkpoints) + 1):
            allowed.release()
        engine.dispose()
    elapsed = time.perf_counter() - t0 - spent
    return reached / elapsed, reached


@dataclass
class Layout:
    """One way of deploying the hub, measured through the broker."""

    name: str
    hub_env: dict[str, str]
    consumers: int = 0
    celery_workers: int = 0
    # Filled by the run: per checkpoint (results, rate, pages, hub CPU ms a result, RSS MB,
    # the workers' share of that CPU), the overall rate and results reached.
    rows: list[tuple[int, float, dict[str, tuple[float, int]], float, float, float]] = field(
        default_factory=list)
    rate: float = 0.0
    reached: int = 0


@dataclass
class Baselines:
    """What the first layout's run also measures with its study's messages."""

    inproc_rate: float = 0.0
    inproc_reached: int = 0
    inproc_windows: dict[int, float] = field(default_factory=dict)
    inproc_cpu: dict[int, float] = field(default_factory=dict)
    raw: float = 0.0


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants (a Celery worker's pool processes)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid``, its reaped children and its live descendants."""
    total = 0.0
    for index, member in enumerate(tree_pids(pid)):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks = int(fields[11]) + int(fields[12])
        if index == 0:
            ticks += int(fields[13]) + int(fields[14])  # children it waited for
        total += ticks / CLOCK_TICKS
    return total


def run_layout(layout: Layout, service_settings: ServiceSettings, n_spokes: int, cases: int,
               checkpoints: list[int], budget: float, samples: int,
               baselines: Baselines | None) -> None:
    """A federation of its own for ``layout``: enrol simulated spokes, launch, then store
    the study through the broker, sampling the pages at each checkpoint. With
    ``baselines``, also measure in-process ingest and the raw broker with the same
    messages (the first layout does)."""
    with tempfile.TemporaryDirectory() as tmp:
        federation = LocalFederation(Path(tmp) / "fed", service_settings,
                                     hub_env=layout.hub_env)
        broker = BrokerSettings(host=service_settings.host, port=service_settings.broker_port,
                                federation=federation.federation)
        worker_pids: list[int] = []
        try:
            federation.start_hub()
            hub_pids = [federation.processes["hub"].popen.pid]
            hub_pids += [federation.start_hub_consumer(i).popen.pid
                         for i in range(layout.consumers)]
            worker_pids += [federation.start_hub_worker(i).popen.pid
                            for i in range(layout.celery_workers)]
            spokes = [SimSpoke(f"sim{i:03d}") for i in range(n_spokes)]
            progress(f"[{layout.name}] enrolling {n_spokes} spokes and launching")
            experiment_id = launch(federation, spokes)
            client = StompClient(broker, "bench-simspokes").start(30)
            hub_keys = [PublicKey.load(Path(f"{federation.hub_key_path}.pub"))]
            for spoke in spokes:
                message = spoke.receive_experiment(client, hub_keys)
                assert message.experiment_id == experiment_id
            progress(f"every spoke received experiment {experiment_id}; signing "
                     f"{n_spokes * cases} results")
            study = Study(experiment_id, spokes, cases)

            if baselines is not None:
                progress("in-process ingestion of the same messages")
                (baselines.inproc_rate, baselines.inproc_reached, baselines.inproc_windows,
                 baselines.inproc_cpu) = in_process(experiment_id, spokes, study,
                                                    checkpoints, budget)
                progress("raw broker baseline")
                baselines.raw = raw_broker_rate(broker, study.results[:min(len(study.results),
                                                                           3000)], 30)
                print(f"raw broker (publish confirmed + consume acked, persistent): "
                      f"{baselines.raw:.0f} msg/s, {1000 / baselines.raw:.2f} ms a message",
                      flush=True)

            def cpus() -> tuple[float, float]:  # every hub process: web, consumers, workers
                workers = sum(tree_cpu(pid) for pid in worker_pids)
                return sum(tree_cpu(pid) for pid in hub_pids) + workers, workers

            last = {"cpu": cpus(), "done": 0}

            def at_checkpoint(reached: int, rate: float) -> None:
                total, workers = cpus()
                count = max(1, reached - last["done"])  # type: ignore[operator]
                per_result = (total - last["cpu"][0]) / count * 1000  # type: ignore[index]
                per_worker = (workers - last["cpu"][1]) / count * 1000  # type: ignore[index]
                figures = sample_pages(federation, experiment_id, samples)
                layout.rows.append((reached, rate, figures, per_result,
                                    sum(rss_mb(p) for pid in hub_pids + worker_pids
                                        for p in tree_pids(pid)), per_worker))
                last["cpu"], last["done"] = cpus(), reached

            layout.rate, layout.reached = through_broker(federation, client, study,
                                                         checkpoints, budget, at_checkpoint)
            client.close()
        finally:
            pool = [p for pid in worker_pids for p in tree_pids(pid)[1:]]
            federation.stop()
            for pid in pool:  # pool processes of a worker that did not stop in time
                with contextlib.suppress(OSError):
                    if b"tributary" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
            left = drain(broker, results_queue(federation.federation))
            if left:
                progress(f"dropped {left} messages the hub had not consumed")


def report(layout: Layout, baselines: Baselines) -> None:
    raw = baselines.raw
    print(f"\nlayout: {layout.name}")
    print(f"{'results':>8} {'broker/s':>9} {'in-proc/s':>10} {'raw/s':>7} "
          f"{'hub CPU ms/result':>18} {'of it workers':>14} {'in-proc CPU ms':>15} "
          f"{'raw ms/msg':>11} {'hub RSS MB':>11}")
    for reached, rate, _, per_result, rss, workers in layout.rows:
        window = baselines.inproc_windows.get(reached)
        own = baselines.inproc_cpu.get(reached)
        print(f"{reached:>8} {rate:>9.1f} {(f'{window:.1f}' if window else '-'):>10} "
              f"{raw:>7.0f} {per_result:>18.2f} "
              f"{(f'{workers:.2f}' if layout.celery_workers else '-'):>14} "
              f"{(f'{own:.2f}' if own else '-'):>15} {1000 / raw:>11.2f} {rss:>11.0f}")
    print(f"\n{'results':>8} {'page':<32} {'p95 ms':>9} {'x health':>9} {'bytes':>10}")
    worst = 0.0
    for reached, _, figures, _, _, _ in layout.rows:
        health = figures[BASELINE_PAGE][0]
        for page, (ms, size) in figures.items():
            print(f"{reached:>8} {page:<32} {ms:>9.1f} {ms / health:>9.1f} {size:>10}")
            if page != BASELINE_PAGE and reached == layout.rows[-1][0]:
                worst = max(worst, ms)
    print(f"in-process: {baselines.inproc_reached} results at {baselines.inproc_rate:.1f}/s "
          f"overall; through broker: {layout.reached} results at {layout.rate:.1f}/s overall "
          f"({layout.rate / raw:.0%} of the raw broker rate; {layout.name}); load average "
          f"{load_average()}")
    size = layout.rows[-1][0] if layout.rows else 0
    print(f"hub-scale: ingest {per_second(baselines.inproc_rate)}/s in-process, "
          f"{per_second(layout.rate)}/s through broker (raw broker {raw:.0f}/s); "
          f"p95 {worst:.0f} ms at {size} cases", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="10 spokes x 30 cases, checkpoints 100 and 300, 40 s a phase")
    parser.add_argument("--spokes", type=int, default=None)
    parser.add_argument("--cases-per-spoke", type=int, default=None)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=None)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="budget of each phase (in-process, through the broker)")
    parser.add_argument("--samples", type=int, default=None, help="requests per page")
    parser.add_argument("--consumers", type=int, default=0,
                        help="run the results consumer as N processes of its own (`tributary "
                             "hub consume`, the web app with TRIBUTARY_HUB_CONSUME_RESULTS="
                             "false) on the same database, as a large hub is deployed; 0 (the "
                             "default): the web process consumes, as a single-process hub")
    parser.add_argument("--celery-workers", type=int, default=0,
                        help="also measure the deployed layout, in the same run after the "
                             "single-process one: N real Celery workers (`tributary hub "
                             "worker`) on the shared redis run the aggregation passes, the "
                             "hub's TRIBUTARY_HUB_CELERY_BROKER_URL points at it; their CPU "
                             "is counted with the hub's and shown apart")
    parser.add_argument("--prefetch-batches", type=int, default=None,
                        help="the hub's TRIBUTARY_HUB_RESULTS_PREFETCH_BATCHES (default: the "
                             "hub's own default)")
    parser.add_argument("--hub-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting of the hub's processes, e.g. "
                             "TRIBUTARY_HUB_AGGREGATE_INTERVAL_SECONDS=3600 to see what the "
                             "aggregation debouncer costs (repeatable)")
    args = parser.parse_args()
    hub_env = dict(item.split("=", 1) for item in args.hub_env)
    quick = args.quick
    n_spokes = args.spokes or (10 if quick else 200)
    cases = args.cases_per_spoke or (30 if quick else 150)
    total = n_spokes * cases
    checkpoints = sorted(c for c in (args.checkpoints or ([100, 300] if quick
                                                           else [1000, 10000, 30000]))
                         if c <= total) or [total]
    budget = args.max_seconds or (40.0 if quick else 3600.0)
    samples = args.samples or (5 if quick else 10)
    prefetch = args.prefetch_batches or HubSettings().results_prefetch_batches
    common = {"TRIBUTARY_HUB_VERIFY_REGISTRY": "false",
              "TRIBUTARY_HUB_RESULTS_PREFETCH_BATCHES": str(prefetch),
              **({"TRIBUTARY_HUB_CONSUME_RESULTS": "false"} if args.consumers else {}),
              **hub_env}
    name = (f"web process + {args.consumers} consumer process(es)" if args.consumers
            else "one hub process (web + consumer)")
    name += "".join(f", {item}" for item in args.hub_env)
    name += f", prefetch {prefetch} batch(es)"
    layouts = [Layout(name + ", aggregation in the web process (Celery eager)", common,
                      consumers=args.consumers)]
    service_settings = ServiceSettings()
    services.up(service_settings)
    if args.celery_workers:
        celery_env = {"TRIBUTARY_HUB_CELERY_BROKER_URL": redis.ensure_running(service_settings)}
        layouts.append(Layout(f"{name}, aggregation on {args.celery_workers} Celery "
                              f"worker(s)", {**common, **celery_env}, consumers=args.consumers,
                              celery_workers=args.celery_workers))
    print(f"hub scale: {n_spokes} spokes x {cases} cases = {total} results; checkpoints "
          f"{checkpoints}; {budget:.0f} s a phase; layouts: "
          f"{'; '.join(layout.name for layout in layouts)}; load average {load_average()}",
          flush=True)
    baselines = Baselines()
    for index, layout in enumerate(layouts):
        run_layout(layout, service_settings, n_spokes, cases, checkpoints, budget, samples,
                   baselines if index == 0 else None)
        progress(f"[{layout.name}] done; load average {load_average()}")
    for layout in layouts:
        report(layout, baselines)


def load_average() -> str:
    """The machine's 1, 5 and 15-minute load averages (other work shares it)."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def per_second(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


if __name__ == "__main__":
    main()
