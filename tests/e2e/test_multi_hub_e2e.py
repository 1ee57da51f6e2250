"""A hub that outgrows one process: a web process and two results consumers on one
PostgreSQL and one broker, the consumers competing for the results queue. One consumer is
killed with SIGKILL mid-stream; the other takes over what it had not acknowledged, and
every signed result is still stored exactly once: one case row, one attempt, one
acceptance in the audit, each spoke's custody chain head where its last record left it,
and the experiment completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from e2e_helpers import wait_for
from signed_results import DIGEST, Spokes, accept, add_experiment
from sqlmodel import Session, func, select

from tributary.hub.aggregation import get_aggregator
from tributary.hub.aggregation.partial import total as total_of
from tributary.hub.db import open_database
from tributary.hub.models import (
    AuditEvent,
    CaseAttempt,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    InboundMessage,
    QuarantinedMessage,
    SpokeChain,
)
from tributary.hub.services import partials
from tributary.hub.settings import HubSettings
from tributary.protocol.broker import StompClient
from tributary.protocol.destinations import results_group, results_queue
from tributary.protocol.messages import (
    CaseStatus,
    ExperimentStatusMessage,
    ResultMessage,
)
from tributary.protocol.messages import (
    ExperimentState as SpokeState,
)
from tributary.protocol.wire import seal
from tributary.services import postgres
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port

pytestmark = pytest.mark.e2e

SPOKES = ["mh-north", "mh-south", "mh-east", "mh-west"]
CASES_PER_SPOKE = 250  # enough that batched consumers are still at it when one dies
BURST = 15  # messages a spoke sends in a row
KILL_AFTER = 100  # results stored before one consumer is killed


def _env(settings: HubSettings) -> dict[str, str]:
    env = {**os.environ, "TRIBUTARY_HUB_DATABASE_URL": settings.database_url,
           "TRIBUTARY_HUB_SIGNING_KEY": str(settings.signing_key),
           "TRIBUTARY_HUB_AUDIT_LOG": str(settings.audit_log),
           "TRIBUTARY_HUB_BROKER_HOST": settings.broker_host,
           "TRIBUTARY_HUB_BROKER_PORT": str(settings.broker_port),
           "TRIBUTARY_HUB_BROKER_FEDERATION": settings.broker_federation,
           "TRIBUTARY_HUB_CONSUME_RESULTS": "false"}
    env.pop("TRIBUTARY_HUB_CELERY_BROKER_URL", None)
    return env


def _stored(engine: object, experiment_id: str) -> int:
    with Session(engine) as session:  # type: ignore[arg-type]
        return session.exec(select(func.count()).select_from(CaseAttempt).where(
            CaseAttempt.experiment_id == experiment_id)).one()


def _cpu(pid: int) -> int:
    """User + system CPU ticks of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_two_consumers_one_killed_store_every_result_exactly_once(
        tmp_path: Path, service_settings: ServiceSettings) -> None:
    server = postgres.ensure_running(service_settings)
    url = postgres.create_database(server, f"hub_{uuid.uuid4().hex[:10]}")
    settings = HubSettings.for_directory(
        tmp_path, database_url=url, signing_key=tmp_path / "hub.key",
        audit_log=tmp_path / "audit.jsonl", broker_host=service_settings.host,
        broker_port=service_settings.broker_port,
        broker_federation=f"t-multihub-{uuid.uuid4().hex[:8]}")
    engine = open_database(settings)
    experiment_id = "exp-multihub"
    cases = {s: [f"{s}-c{i:03d}" for i in range(CASES_PER_SPOKE)] for s in SPOKES}
    with Session(engine) as session:
        spokes = Spokes(session, SPOKES)
        add_experiment(session, experiment_id, SPOKES, "summary", {})
        for spoke in SPOKES:
            accept(session, experiment_id, spoke, cases[spoke])

    # Each spoke's messages in chain order, its status last.
    streams: dict[str, list[str]] = {}
    result_ids: dict[str, tuple[str, str]] = {}
    for spoke in SPOKES:
        streams[spoke] = []
        for case in cases[spoke]:
            result = spokes.sign(ResultMessage(
                experiment_id=experiment_id, spoke_id=spoke, case_id=case,
                status=CaseStatus.SUCCEEDED, output={"volume": float(len(case))},
                image_digest=DIGEST, finished_at=datetime.now(UTC)))
            result_ids[result.message_id] = (spoke, case)
            streams[spoke].append(seal(result, spokes.keys[spoke]))
        streams[spoke].append(seal(ExperimentStatusMessage(
            experiment_id=experiment_id, spoke_id=spoke, state=SpokeState.COMPLETED),
            spokes.keys[spoke]))
    total = len(result_ids)

    env = _env(settings)
    port = free_port()
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("web", "c1", "c2")}  # noqa: SIM115
    processes = {
        "web": subprocess.Popen([sys.executable, "-m", "tributary.cli", "hub", "serve",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=logs["web"], stderr=subprocess.STDOUT)}
    try:
        wait_for(lambda: _healthy(port), 30, "the web process")
        # The backlog the consumers compete for, each spoke's messages in bursts as its
        # outbox sends them. A spoke's messages form one group (results_group): the broker
        # hands a group to one consumer at a time, in order, and to another if it dies.
        client = StompClient(settings.broker(), "multihub-test").start(30)
        try:
            queue = results_queue(settings.broker_federation)
            for start in range(0, CASES_PER_SPOKE + 1, BURST):
                for spoke in SPOKES:
                    for body in streams[spoke][start:start + BURST]:
                        client.publish(queue, body, results_group(spoke))
        finally:
            client.close()
        published_at = time.monotonic()
        for name in ("c1", "c2"):
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", "tributary.cli", "hub", "consume"], env=env,
                stdout=logs[name], stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while _stored(engine, experiment_id) < KILL_AFTER:  # polled closely: they are fast
            assert time.monotonic() < deadline, f"{KILL_AFTER} results stored in 60 s"
            time.sleep(0.02)
        # The busier one dies: a consumer takes a batch of messages at a time, so one may
        # hold every spoke's group while the other waits.
        victim, survivor_name = sorted(("c1", "c2"), key=lambda n: -_cpu(processes[n].pid))
        processes[victim].send_signal(signal.SIGKILL)
        processes[victim].wait(10)
        killed_at = _stored(engine, experiment_id)
        assert killed_at < total, "the stream must still be running when a consumer dies"

        def completed() -> bool:
            with Session(engine) as session:
                experiment = session.get(Experiment, experiment_id)
                assert experiment is not None
                return experiment.state == ExperimentState.COMPLETED
        wait_for(completed, 90, "the experiment completed by the surviving consumer")
        print(f"{total} results stored in {time.monotonic() - published_at:.1f} s")
        assert processes[survivor_name].poll() is None, "the surviving consumer keeps running"
        assert _healthy(port), "the web process still serves"
        time.sleep(1)  # anything still in flight would show as a duplicate below

        with Session(engine) as session:
            rows = session.exec(select(CaseResult).where(
                CaseResult.experiment_id == experiment_id)).all()
            attempts = session.exec(select(CaseAttempt).where(
                CaseAttempt.experiment_id == experiment_id)).all()
            inbound = session.exec(select(InboundMessage.message_id)).all()
            chains = {c.spoke_id: (c.sequence, c.record_sha256)
                      for c in session.exec(select(SpokeChain)).all()}
            events = session.exec(select(AuditEvent)).all()
            quarantined = session.exec(select(QuarantinedMessage)).all()
            sums = partials.stored(session, experiment_id)

        # Every case row holds its result, once; every attempt is there, once.
        assert len(rows) == total
        assert all(r.state == CaseState.SUCCEEDED for r in rows)
        assert {r.result_message_id: (r.spoke_id, r.case_id) for r in rows} == result_ids
        assert Counter(a.result_message_id for a in attempts) == Counter(set(result_ids))
        assert len({(a.spoke_id, a.case_id, a.attempt) for a in attempts}) == total
        # Each message id is known once; each chain head is the last record signed.
        assert set(result_ids) <= set(inbound) and len(inbound) == len(set(inbound))
        assert chains == {s: spokes.heads[s] for s in SPOKES}
        # Accepted once in the audit per message id, nothing refused or set aside.
        received = Counter(e.detail.get("message_id") for e in events
                           if e.action == "message.received" and e.detail.get("kind") == "result")
        assert received == Counter(set(result_ids))
        assert not any(e.detail.get("duplicate") for e in events
                       if e.action == "message.received")
        assert not [e for e in events if e.action in ("message.rejected",
                                                      "result.quarantined")]
        assert quarantined == []
        assert sum(e.action == "experiment.completed" for e in events) == 1
        # The running sums both consumers kept count each result once too.
        summary = get_aggregator("summary", {})
        assert sums == {s: total_of(summary.contribution(partials.view(r)) for r in rows
                                    if r.spoke_id == s) for s in SPOKES}
        # The survivor took over what the killed consumer held unacknowledged.
        logs[survivor_name].flush()
        survivor = (tmp_path / f"{survivor_name}.log").read_text()
        assert "redelivered" in survivor, survivor[-4000:]
    finally:
        for name, process in processes.items():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
            logs[name].close()
        engine.dispose()  # type: ignore[attr-defined]
