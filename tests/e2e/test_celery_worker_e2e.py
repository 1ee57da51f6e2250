"""Aggregation on a real Celery broker (redis from Debian, started by the project's own
starter) with a separate worker process (`tributary hub worker`): the snapshots it stores
carry exactly the figures the in-process (eager) mode computes for the same results. The
broker-mode hub database is SQLite, then PostgreSQL (the usual choice with workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from signed_results import Spokes, accept, add_experiment, send_result
from sqlmodel import Session, col, select

from tributary.hub import worker
from tributary.hub.db import make_engine, open_database
from tributary.hub.models import AggregateSnapshot, Experiment
from tributary.hub.services import debounce
from tributary.hub.services.aggregation import aggregate, inputs_digest
from tributary.hub.services.debounce import Debouncer
from tributary.hub.settings import HubSettings
from tributary.services import postgres, redis
from tributary.services.settings import ServiceSettings

pytestmark = pytest.mark.e2e
K = 5


def cohort() -> dict[str, list[tuple[float, int, float]]]:
    """(score, label, volume) per case, per spoke; 'east' is a small cell."""
    rng = np.random.default_rng(11)
    data = {}
    for spoke, size in (("north", 40), ("river", 25), ("east", 3)):
        labels = (rng.random(size) < 0.4).astype(int)
        scores = np.round(rng.normal(labels, 0.8), 2)
        data[spoke] = [(float(s), int(y), float(round(rng.uniform(1, 40), 1)))
                       for s, y in zip(scores, labels, strict=True)]
    return data


def run_study(session: Session) -> None:
    """Two experiments (binary classification, summary) over the same cases, their results
    interleaved as spokes would send them."""
    data = cohort()
    spokes = Spokes(session, list(data))
    add_experiment(session, "exp-bin", list(data), "binary-classification",
                   {"score": "prediction.p", "label": "diagnosis", "threshold": 0.5})
    add_experiment(session, "exp-sum", list(data), "summary", {})
    for experiment in ("exp-bin", "exp-sum"):
        for spoke, cases in data.items():
            accept(session, experiment, spoke, [f"{spoke}-{i}" for i in range(len(cases))])
    for spoke, cases in data.items():
        for i, (p, y, volume) in enumerate(cases):
            output: dict[str, Any] = {"prediction": {"p": p}, "volume_ml": volume}
            for experiment in ("exp-bin", "exp-sum"):
                assert send_result(session, spokes, experiment, spoke, f"{spoke}-{i}", output,
                                   {"diagnosis": y})


def latest(session: Session, experiment_id: str) -> AggregateSnapshot | None:
    session.expire_all()
    return session.exec(select(AggregateSnapshot).where(
        AggregateSnapshot.experiment_id == experiment_id)
        .order_by(col(AggregateSnapshot.version).desc())).first()


def stop(process: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Warm shutdown (SIGTERM); Celery may take half a minute to hand back an unacked
    message, so after that the worker's own process group is killed."""
    process.terminate()
    try:
        process.wait(timeout=45)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def redis_url(service_settings: ServiceSettings) -> str:
    return redis.ensure_running(service_settings)


@pytest.fixture
def restore_worker_config() -> Iterator[None]:
    yield
    worker.configure(HubSettings())


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, service_settings: ServiceSettings,
             tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'celery' / 'hub.db'}"
    server = postgres.ensure_running(service_settings)
    return postgres.create_database(server, f"celery_{uuid.uuid4().hex[:10]}")


def test_worker_process_aggregates_like_in_process(tmp_path: Path, redis_url: str,
                                                   database: str,
                                                   restore_worker_config: None) -> None:
    # In-process (eager) mode: the hub runs each task itself.
    eager_settings = HubSettings.for_directory(tmp_path / "eager", min_cell_size=K)
    (tmp_path / "eager").mkdir()
    eager_engine = make_engine(eager_settings.database_url)
    worker.configure(eager_settings, eager_engine)
    with Session(eager_engine) as session:
        run_study(session)
        # Results only mark the studies stale: one pass of the hub's debouncer computes.
        assert sorted(Debouncer(eager_settings, eager_engine).run_once()) == [
            "exp-bin", "exp-sum"]
        eager = {e: latest(session, e).model_dump() for e in ("exp-bin", "exp-sum")}

    # Broker mode: the hub only enqueues; a separate worker process computes.
    (tmp_path / "celery").mkdir()
    namespace = f"t-{uuid.uuid4().hex[:8]}"  # our own queue on the shared redis
    settings = HubSettings.for_directory(tmp_path / "celery", min_cell_size=K,
                                         celery_broker_url=redis_url,
                                         broker_federation=namespace, database_url=database,
                                         audit_log=tmp_path / "celery" / "audit.jsonl",
                                         aggregate_interval_seconds=0.5,
                                         aggregate_full_interval_seconds=1)
    engine = open_database(settings)
    worker.configure(settings)
    debouncer = debounce.start(settings, engine)  # as the hub does: enqueues stale studies
    log = tmp_path / "worker.log"
    env = {**os.environ, "TRIBUTARY_HUB_DATABASE_URL": settings.database_url,
           "TRIBUTARY_HUB_AUDIT_LOG": str(settings.audit_log),
           "TRIBUTARY_HUB_CELERY_BROKER_URL": redis_url,
           "TRIBUTARY_HUB_BROKER_FEDERATION": namespace,
           "TRIBUTARY_HUB_MIN_CELL_SIZE": str(K),
           "TRIBUTARY_HUB_AGGREGATE_FULL_INTERVAL_SECONDS": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("tributary")), "hub", "worker",
             "--concurrency", "2"], env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        with Session(engine) as session:
            run_study(session)
            deadline = time.monotonic() + 120
            done: dict[str, dict[str, Any]] = {}
            while time.monotonic() < deadline and len(done) < 2:
                assert process.poll() is None, log.read_text()[-3000:]
                for experiment_id in ("exp-bin", "exp-sum"):
                    snapshot = latest(session, experiment_id)
                    experiment = session.get(Experiment, experiment_id)
                    assert experiment is not None
                    # Current, and every figure from every result (no snapshot between
                    # full passes: the study stays stale until its full pass is made).
                    if snapshot is not None and snapshot.inputs_sha256 == inputs_digest(
                            session, experiment, K) and not snapshot.report.get("full_pass"):
                        done[experiment_id] = snapshot.model_dump()
                time.sleep(0.5)
            assert len(done) == 2, "the worker did not catch up:\n" + log.read_text()[-3000:]
            fresh = {e: aggregate(session, session.get(Experiment, e), K).model_dump(
                mode="json") for e in done}
    finally:
        debouncer.stop()
        stop(process)
    assert "aggregate_experiment" in log.read_text()  # the tasks ran in the worker

    for experiment_id, snapshot in done.items():
        reference = eager[experiment_id]
        assert snapshot["results"] == reference["results"] == 68
        assert snapshot["report"] == reference["report"]  # identical figures, both modes
        assert snapshot["report"]["groups"] == fresh[experiment_id]["groups"]
    groups = done["exp-bin"]["report"]["groups"]
    assert groups["east"]["figures"]["auc"]["suppressed"] == f"fewer than {K} cases"
    assert groups["north"]["figures"]["auc"]["ci_method"] == "delong"
    assert groups["pooled"]["roc"]["points"]
    assert done["exp-sum"]["report"]["groups"]["pooled"]["figures"]["volume_ml.n"]["value"] == 68
