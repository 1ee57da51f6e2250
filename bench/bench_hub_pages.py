"""Pages and API of the hub for a large study: 200 spokes x 150 cases (30,000 realistic
case rows: custody record, output, released attributes, attempt history), timed through
the FastAPI app. Prints p50/p95 milliseconds and bytes per page or endpoint, and the cost
of one live-stream poll (shared by every viewer of the study).

    .venv/bin/python bench/bench_hub_pages.py [--spokes 200 --cases 150 --repeats 20]

Run it on two commits to compare (the script uses only the hub's public app, models and
user service)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import insert
from sqlmodel import Session

from tributary.hub.main import create_app
from tributary.hub.models import (
    Algorithm,
    CaseAttempt,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Spoke,
    TargetState,
    utcnow,
)
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings

EXPERIMENT = "exp-bench"
PASSWORD = "a long enough password"


def custody(spoke: str, case: str, n: int) -> dict[str, Any]:
    """About the size of what the results consumer stores (a signed custody record)."""
    return {"spoke_id": spoke, "sequence": n, "case_id": case,
            "previous_sha256": uuid.uuid4().hex * 2, "output_sha256": uuid.uuid4().hex * 2,
            "image_digest": "sha256:" + "ab" * 32, "key_id": "k-" + uuid.uuid4().hex,
            "signature": uuid.uuid4().hex * 8, "signed_at": utcnow().isoformat(),
            "steps": [{"step": s, "at": utcnow().isoformat(), "sha256": uuid.uuid4().hex * 2}
                      for s in ("selected", "started", "finished", "released")]}


def fill(engine: Any, spokes: int, cases: int) -> None:
    now = utcnow()
    with Session(engine) as session:
        session.add(Algorithm(id=1, name="nodules", version="1", repository="r/nodules",
                              digest="sha256:" + "0" * 64))
        names = [f"spoke-{i:03d}" for i in range(spokes)]
        for name in names:
            session.add(Spoke(id=name, name=name, last_seen_at=now))
        session.flush()
        experiment = Experiment(id=EXPERIMENT, name="bench", algorithm_id=1,
                                state=ExperimentState.LAUNCHED, launched_at=now,
                                aggregator="summary",
                                aggregator_parameters={},
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
        results, attempts = [], []
        for s, name in enumerate(names):
            for c in range(cases):
                case = f"case-{c:04d}"
                n = s * cases + c
                failed = n % 37 == 0
                state = (CaseState.FAILED if failed else CaseState.RUNNING if n % 11 == 0
                         else CaseState.SUCCEEDED)
                results.append(dict(
                    experiment_id=EXPERIMENT, spoke_id=name, case_id=case, state=state,
                    attempt=1, image_digest="sha256:" + "ab" * 32, started_at=now,
                    finished_at=now, result_message_id=f"m-{n}", received_at=now,
                    output=None if failed else {"p": (n % 100) / 100, "nodules": n % 4,
                                                "volume_ml": 1.5 + n % 7},
                    failure={"reason": "exit", "detail": "exit code 1"} if failed else None,
                    released={"y": n % 2, "age_band": "60-69", "sex": "F"},
                    custody=custody(name, case, n), custody_sha256=uuid.uuid4().hex * 2))
                attempts.append(dict(experiment_id=EXPERIMENT, spoke_id=name, case_id=case,
                                     attempt=1, state=state, started_at=now,
                                     result_message_id=f"m-{n}",
                                     custody_sha256=results[-1]["custody_sha256"],
                                     finished_at=now, received_at=now))
        session.execute(insert(CaseResult), results)
        session.execute(insert(CaseAttempt), attempts)
        session.commit()


def timed(client: TestClient, path: str, repeats: int) -> tuple[float, float, int]:
    times, size = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - t0) * 1000)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])
        size = len(response.content)
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return statistics.median(times), p95, size


def _images(page: str) -> list[str]:
    """The images the experiment page loads by URL (the many-spokes forest plot)."""
    urls, marker = [], '<img class="plot" src="'
    for part in page.split(marker)[1:]:
        urls.append(part.split('"', 1)[0].replace("&amp;", "&"))
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spokes", type=int, default=200)
    parser.add_argument("--cases", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--database-url", default="",
                        help="An empty database to fill (default a temporary SQLite file).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides: dict[str, Any] = {"signing_key": Path(tmp) / "hub.key",
                                     "consume_results": False, "broker_federation": "bench"}
        if args.database_url:
            overrides["database_url"] = args.database_url
        settings = HubSettings.for_directory(Path(tmp), **overrides)
        with TestClient(create_app(settings)) as client:
            engine = client.app.state.engine  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            fill(engine, args.spokes, args.cases)
            print(f"filled {args.spokes} spokes x {args.cases} cases in "
                  f"{time.perf_counter() - t0:.1f} s")
            with Session(engine) as session:
                create_user(session, "bench", PASSWORD, ["admin"])  # type: ignore[list-item]
                token, _ = issue_token(session, "bench", PASSWORD)  # type: ignore[misc]
            client.headers["Authorization"] = f"Bearer {token}"
            first = client.get(f"/experiments/{EXPERIMENT}")  # the first snapshot
            paths = [f"/experiments/{EXPERIMENT}", f"/experiments/{EXPERIMENT}/results",
                     *_images(first.text),
                     f"/experiments/{EXPERIMENT}/results?sort=failed&desc=true&page=3",
                     f"/experiments/{EXPERIMENT}/spokes/spoke-000",
                     f"/api/experiments/{EXPERIMENT}", f"/api/experiments/{EXPERIMENT}/cases",
                     f"/api/experiments/{EXPERIMENT}/cases?limit=1000&state=failed",
                     f"/api/experiments/{EXPERIMENT}/aggregate",
                     "/api/experiments", "/", "/api/spokes", "/spokes"]
            print(f"{'page or endpoint':<58} {'p50 ms':>8} {'p95 ms':>8} {'bytes':>10}")
            worst, page_size = 0.0, 0
            for path in paths:
                p50, p95, size = timed(client, path, args.repeats)
                worst = max(worst, p95)
                page_size = size if path == paths[0] else page_size
                print(f"{path[:58]:<58} {p50:>8.1f} {p95:>8.1f} {size:>10}")
            t0 = time.perf_counter()
            with client.stream("GET", f"/api/experiments/{EXPERIMENT}/events") as response:
                first = b""
                for chunk in response.iter_bytes():
                    first += chunk
                    if b"\n\n" in first[first.find(b"data:"):] and b"data:" in first:
                        break
            print(f"{'first live event (experiment stream)':<58} "
                  f"{(time.perf_counter() - t0) * 1000:>8.1f} {'':>8} {len(first):>10}")
            poll = _poll_cost(engine, settings.spoke_online_seconds, args.repeats)
            if poll is not None:
                print(f"{'one live poll, shared by all viewers (ms of CPU per s)':<58} "
                      f"{poll:>8.1f}")
            print(f"hub-pages: p95 {worst:.0f} ms (worst page or endpoint), experiment page "
                  f"{page_size / 1e6:.2f} MB at {args.spokes * args.cases} cases")


def _poll_cost(engine: Any, window: float, repeats: int) -> float | None:
    """CPU of one poll of the study's live feed (once per second for every viewer)."""
    try:
        from tributary.hub.api.events import experiment_state
    except ImportError:  # an older hub: one full snapshot per viewer per second
        return None
    t0 = time.process_time()
    for _ in range(repeats):
        experiment_state(engine, EXPERIMENT, window)
    return (time.process_time() - t0) / repeats * 1000


if __name__ == "__main__":
    main()
