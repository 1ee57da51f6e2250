"""What viewers of a running study cost the hub: ``tributary hub serve`` as its own
process on a study of 200 spokes x 150 cases (30,000 case rows) while results keep arriving,
its CPU (from /proc) measured over a window with no viewer, then over the same window with
100 real SSE clients (another process: this one, asyncio + httpx) on the study's live stream,
then again with none (the cost is the viewers' window less the mean of the two others).

    .venv/bin/python bench/bench_viewers.py [--viewers 100 --window 20 --rate 50]
    .venv/bin/python bench/bench_viewers.py --dashboard   # viewers also re-read what the
                                                          # dashboard page re-reads

Results "arrive" by this process updating case rows and marking the study stale, as the
hub's ingest does (no broker needed), so the hub's own aggregation debouncer runs in both
windows. With ``--dashboard`` each viewer also does what dashboard.js does on an event: the
results fragment when the snapshot version changes (at most every 4 s, 10 s above 1,000
cases) and the first page of cases when counts change (at most every 2 s, and only up to
1,000 cases: above, the page offers a button instead), and the images a new fragment
names. The last line reads ``viewers: N viewers cost C of a core (hub A with, B without)
at M cases``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert, update
from sqlmodel import Session, col, select

from tributary.hub.db import make_engine
from tributary.hub.models import (
    Algorithm,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Spoke,
    TargetState,
    utcnow,
)
from tributary.hub.services.debounce import mark_stale
from tributary.hub.services.users import create_user, issue_token

EXPERIMENT = "exp-viewers"
PASSWORD = "a long enough password"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: dashboard.js's LARGE_STUDY: above it, viewers re-read the case table on demand only.
LARGE_STUDY = 1000
#: dashboard.js's LIST_SPACING: the experiments list is re-read at most this often.
LIST_SPACING = 15.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(database_url: str, spokes: int, cases: int, done: float) -> str:
    """The study, ``done`` of each spoke's cases finished and the rest queued; a bearer
    token for an administrator."""
    engine = make_engine(database_url)
    now = utcnow()
    with Session(engine) as session:
        session.add(Algorithm(id=1, name="nodules", version="1", repository="r/nodules",
                              digest="sha256:" + "0" * 64))
        names = [f"spoke-{i:03d}" for i in range(spokes)]
        for name in names:
            session.add(Spoke(id=name, name=name, last_seen_at=now + timedelta(days=1)))
        session.flush()
        experiment = Experiment(id=EXPERIMENT, name="viewers", algorithm_id=1,
                                state=ExperimentState.LAUNCHED, launched_at=now,
                                aggregator="summary", aggregator_parameters={},
                                expires_at=now + timedelta(days=30))
        if hasattr(experiment, "aggregate_incremental"):
            # Rows written here, not by ingest, have no running sums: full passes only.
            experiment.aggregate_incremental = False
        session.add(experiment)
        session.flush()
        for name in names:
            session.add(ExperimentTarget(experiment_id=EXPERIMENT, spoke_id=name,
                                         state=TargetState.ACCEPTED, case_count=cases))
        session.commit()
        rows = []
        for s, name in enumerate(names):
            for c in range(cases):
                n = s * cases + c
                finished = c < cases * done
                rows.append(dict(
                    experiment_id=EXPERIMENT, spoke_id=name, case_id=f"case-{c:04d}",
                    state=CaseState.SUCCEEDED if finished else CaseState.QUEUED, attempt=1,
                    received_at=now if finished else None, result_message_id=f"m-{n}"
                    if finished else None, output={"p": (n % 100) / 100, "nodules": n % 4}
                    if finished else None, released={"y": n % 2}))
        session.execute(insert(CaseResult), rows)
        session.commit()
        create_user(session, "bench", PASSWORD, ["admin"])  # type: ignore[list-item]
        token, _ = issue_token(session, "bench", PASSWORD)  # type: ignore[misc]
    engine.dispose()
    return token


class Results(threading.Thread):
    """Results arriving at ``rate`` per second: queued cases become succeeded and the study
    is marked stale, in one transaction per tick (what ingest writes, without its checks)."""

    def __init__(self, database_url: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.engine = make_engine(database_url, migrate=False)
        self.rate, self.stored = rate, 0
        self.stop = threading.Event()

    def run(self) -> None:
        tick = 0.2
        while not self.stop.wait(tick):
            with Session(self.engine) as session:
                ids = session.exec(select(CaseResult.id).where(
                    CaseResult.experiment_id == EXPERIMENT,
                    CaseResult.state == CaseState.QUEUED)
                    .limit(max(1, round(self.rate * tick)))).all()
                if not ids:
                    return
                now = utcnow()
                for case_id in ids:
                    session.execute(update(CaseResult).where(col(CaseResult.id) == case_id)
                                    .values(state=CaseState.SUCCEEDED, received_at=now,
                                            result_message_id=f"r-{case_id}",
                                            output={"p": (case_id % 100) / 100,
                                                    "nodules": case_id % 4}))
                mark_stale(session, EXPERIMENT)
                session.commit()
                self.stored += len(ids)


class Hub:
    """``tributary-hub serve`` in a process of its own, on the bench's database."""

    def __init__(self, directory: Path, database_url: str) -> None:
        self.port = free_port()
        env = {**os.environ, "TRIBUTARY_HUB_DATABASE_URL": database_url,
               "TRIBUTARY_HUB_SIGNING_KEY": str(directory / "hub.key"),
               "TRIBUTARY_HUB_CONSUME_RESULTS": "false",
               "TRIBUTARY_HUB_BROKER_PORT": str(free_port()),  # none: not needed here
               "TRIBUTARY_HUB_BROKER_FEDERATION": "bench-viewers"}
        hub = Path(sys.executable).with_name("tributary-hub")
        self.process = subprocess.Popen(
            [str(hub), "serve", "--port", str(self.port)], env=env,
            stdout=subprocess.DEVNULL, stderr=open(directory / "hub.log", "w"))  # noqa: SIM115
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the hub did not start; see {directory / 'hub.log'}")
            time.sleep(0.3)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Viewers:
    """``count`` SSE clients on the study's stream, in an event loop of their own thread."""

    def __init__(self, url: str, token: str, count: int, dashboard: bool,
                 list_page: bool = False) -> None:
        self.url, self.token, self.count, self.dashboard = url, token, count, dashboard
        self.list_page = list_page
        self.connected = 0
        self.events = 0
        self.fetches = 0
        self.latencies: list[float] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.tasks: list[Any] = []
        self.background: set[asyncio.Future[None]] = set()

    def start(self) -> None:
        self.thread.start()
        self.client = httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"},
            timeout=httpx.Timeout(30, read=None),
            limits=httpx.Limits(max_connections=self.count * 3))
        for _ in range(self.count):
            self.tasks.append(asyncio.run_coroutine_threadsafe(self._view(), self.loop))

    async def _later(self, kind: str, path: str, wait: float, pending: dict[str, bool],
                     seen: set[str]) -> None:
        await asyncio.sleep(wait)
        pending[kind] = False
        t0 = time.monotonic()
        with contextlib.suppress(httpx.HTTPError, RuntimeError):  # (closed at the end)
            page = await self.client.get(path)
            self.fetches += 1
            self.latencies.append(time.monotonic() - t0)
            # The browser then loads the images the new fragment names (once per URL).
            for part in page.text.split('<img class="plot" src="')[1:]:
                url = part.split('"', 1)[0].replace("&amp;", "&")
                if url not in seen:  # this viewer's browser cache
                    seen.add(url)
                    await self.client.get(url)
                    self.fetches += 1

    async def _view_list(self) -> None:
        """A viewer of the experiments list (``/``): as dashboard.js, the page is re-read
        when the list's stream says something changed, at most every LIST_SPACING seconds
        (spread over two), except the first event (the page already shows it)."""
        first, pending, last = True, False, 0.0
        seen: set[str] = set()

        def schedule() -> None:
            nonlocal pending, last
            if pending:
                return
            pending = True
            wait = max(random.uniform(0, 2), last + LIST_SPACING - time.monotonic())
            last = time.monotonic() + wait

            async def read() -> None:
                nonlocal pending
                await self._later("list", "/", wait, {}, seen)
                pending = False
            fetch = asyncio.ensure_future(read())
            self.background.add(fetch)
            fetch.add_done_callback(self.background.discard)

        async with self.client.stream("GET", "/api/experiments/events") as r:
            self.connected += 1
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    self.events += 1
                    if first:
                        first = False
                    elif self.dashboard:  # (the study runs on: never a state change)
                        schedule()

    async def _view(self) -> None:
        if self.list_page:
            return await self._view_list()
        snapshot, last = None, {"results": 0.0, "cases": 0.0}
        pending = {"results": False, "cases": False}
        seen: set[str] = set()
        paths = {"results": f"/experiments/{EXPERIMENT}/results",
                 "cases": f"/api/experiments/{EXPERIMENT}/cases"}
        spacing = {"results": 4.0, "cases": 2.0}
        large = False  # as dashboard.js: above LARGE_STUDY cases, cases on demand only

        def schedule(kind: str) -> None:  # as dashboard.js: at most one per spacing
            if pending[kind]:
                return
            pending[kind] = True
            spread = random.uniform(0, 2) if large and kind == "results" else 0.0
            wait = max(spread, last[kind] + spacing[kind] - time.monotonic())
            last[kind] = time.monotonic() + wait
            fetch = asyncio.ensure_future(self._later(kind, paths[kind], wait, pending, seen))
            self.background.add(fetch)  # kept until done (the loop holds weak references)
            fetch.add_done_callback(self.background.discard)

        async with self.client.stream("GET", f"/api/experiments/{EXPERIMENT}/events") as r:
            self.connected += 1
            name = ""
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:") and name == "progress":
                    self.events += 1
                    data = json.loads(line[5:])
                    if not data.get("delta"):
                        large = sum(t.get("case_count") or 0
                                    for t in data["experiment"]["targets"]) > LARGE_STUDY
                        spacing["results"] = 10.0 if large else 4.0
                    if self.dashboard:
                        if snapshot is not None and data.get("snapshot") != snapshot:
                            schedule("results")
                        if data.get("delta") and data["experiment"]["targets"] and not large:
                            schedule("cases")
                    snapshot = data.get("snapshot")

    def stop(self) -> None:
        if not self.thread.is_alive() or not self.loop.is_running():
            return
        for task in self.tasks:
            task.cancel()
        for fetch in list(self.background):
            self.loop.call_soon_threadsafe(fetch.cancel)
        asyncio.run_coroutine_threadsafe(self.client.aclose(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def window(pid: int, seconds: float) -> float:
    """The process's CPU over ``seconds`` of wall time, in cores."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spokes", type=int, default=200)
    parser.add_argument("--cases", type=int, default=150)
    parser.add_argument("--viewers", type=int, default=100)
    parser.add_argument("--window", type=float, default=20.0, help="seconds per window")
    parser.add_argument("--rate", type=float, default=50.0, help="results per second")
    parser.add_argument("--dashboard", action="store_true",
                        help="viewers also re-read the results fragment and cases page")
    parser.add_argument("--list", action="store_true",
                        help="viewers of the experiments list (/) instead of the study")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        database_url = f"sqlite:///{directory / 'hub.db'}"
        # A third of every spoke's cases done: enough arrive for both windows and more.
        token = fill(database_url, args.spokes, args.cases, done=0.3)
        hub = Hub(directory, database_url)
        results = Results(database_url, args.rate)
        viewers = Viewers(hub.url, token, args.viewers, args.dashboard, args.list)
        connected = 0
        try:
            results.start()
            time.sleep(max(5.0, args.window / 4))  # the first snapshots, then steady state
            before = baseline(hub, results, args.window, "0 viewers")
            viewers.start()
            deadline = time.monotonic() + 60
            while viewers.connected < args.viewers and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(5.0)  # every viewer past its first event
            events, fetches, stored = viewers.events, viewers.fetches, results.stored
            with_viewers = window(hub.process.pid, args.window)
            connected = viewers.connected
            print(f"{connected} viewers: hub {with_viewers:.3f} of a core "
                  f"({(results.stored - stored) / args.window:.0f} results/s arriving, "
                  f"{(viewers.events - events) / args.window:.1f} events/s and "
                  f"{(viewers.fetches - fetches) / args.window:.1f} page reads/s received)")
            viewers.stop()
            time.sleep(3.0)  # the hub notices the closed streams
            after = baseline(hub, results, args.window, "0 viewers again")
            if results.stored >= args.spokes * args.cases:
                print("warning: every case finished during the run; lower --rate")
        finally:
            results.stop.set()
            with contextlib.suppress(Exception):
                viewers.stop()
            hub.close()
        # The baseline (mostly the debouncer's recomputations) varies between windows:
        # the viewers' window is compared with the mean of one before and one after.
        without = (before + after) / 2
        cost = with_viewers - without
        mode = (" of the experiments list" if args.list else "") + (
            " (reading like the dashboard)" if args.dashboard else "")
        print(f"viewers: {connected} viewers{mode} cost {cost:.3f} of a core (hub "
              f"{with_viewers:.3f} with, {without:.3f} without) at "
              f"{args.spokes * args.cases} cases")


def baseline(hub: Hub, results: Results, seconds: float, label: str) -> float:
    stored = results.stored
    cores = window(hub.process.pid, seconds)
    print(f"{label}: hub {cores:.3f} of a core "
          f"({(results.stored - stored) / seconds:.0f} results/s arriving)")
    return cores

if __name__ == "__main__":
    main()
