"""The spoke survives its own death, its container's, and the broker's: real spoke
processes, real containers, the real broker (a private one when it is to be killed).

What is checked is what the hub ends up with: every case exactly one accepted result,
nothing left behind, nothing run twice.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import docker
import pytest

from tributary.protocol.broker import BrokerSettings, Delivery, StompClient
from tributary.protocol.destinations import results_queue, spoke_queue
from tributary.protocol.messages import (
    AlgorithmRef,
    CancelExperimentMessage,
    CaseProgressMessage,
    ExperimentMessage,
    ExperimentStatusMessage,
    HeartbeatMessage,
    ResultMessage,
    RetryCasesMessage,
    RunLimits,
)
from tributary.protocol.release import sign_approval
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import open_from_spoke, seal
from tributary.services import broker as broker_service
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e

SCHEMA = {"type": "object", "properties": {"behaviour": {"type": "string"},
                                           "seconds": {"type": "number"}}}
T = TypeVar("T")


def wait_for(probe: Callable[[], T], timeout: float, what: str, every: float = 0.3) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(every)


def containers(spoke_id: str, running_only: bool = False) -> list[Any]:
    client = docker.from_env()
    try:
        return client.containers.list(all=not running_only,
                                      filters={"label": f"org.tributary.spoke={spoke_id}"},
                                      ignore_removed=True)
    finally:
        client.close()


def audit_entries(config: Path, action: str) -> list[dict[str, Any]]:
    lines = (config.parent / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["action"] == action]


def custody_attempt(federation: LocalFederation, case: dict[str, Any]) -> int:
    """The attempt the spoke signed into the custody record the hub accepted."""
    with sqlite3.connect(federation.root / "hub.db") as db:
        envelope = db.execute("SELECT custody FROM caseresult WHERE experiment_id=? AND "
                              "case_id=?", (case["experiment_id"], case["case_id"])).fetchone()
    statement = json.loads(base64.b64decode(json.loads(envelope[0])["payload"]))
    return int(statement["predicate"]["attempt"])


def add_spoke(federation: LocalFederation, prefix: str, cases: int, concurrency: int,
              liveness: str = "") -> tuple[str, Path]:
    spoke_id = f"{prefix}-{uuid.uuid4().hex[:6]}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, cases, seed=len(prefix), site=f"{prefix} site")
    if federation.admin_token:
        config = federation.add_spoke(spoke_id, data, concurrency=concurrency)
    else:
        config = federation.spoke_config(spoke_id, data, concurrency=concurrency)
    if liveness:
        config.write_text(config.read_text() + f"\n[liveness]\n{liveness}\n")
    return spoke_id, config


def register(federation: LocalFederation, image: tuple[str, str], spoke_id: str) -> int:
    algorithm = federation.register_algorithm(
        name=f"slow-{spoke_id}", version="1", repository=image[0], digest=image[1],
        argument_schema=SCHEMA)
    return int(algorithm["id"])


def launch(federation: LocalFederation, spoke_id: str, algorithm_id: int,
           arguments: dict[str, Any]) -> str:
    with federation.api() as api:
        created = api.post("/api/experiments", json={
            "name": f"durability {arguments}", "algorithm_id": algorithm_id,
            "arguments": arguments, "spoke_ids": [spoke_id],
            "limits": {"timeout_seconds": 300, "memory_mb": 256}})
        assert created.status_code == 201, created.text
        experiment_id = str(created.json()["id"])
        api.post(f"/api/experiments/{experiment_id}/launch").raise_for_status()
    return experiment_id


def hub_cases(federation: LocalFederation, experiment_id: str) -> list[dict[str, Any]]:
    with federation.api() as api:
        cases = api.get(f"/api/experiments/{experiment_id}/cases").raise_for_status().json()
    return [{**c, "experiment_id": experiment_id} for c in cases]


def accepted_results(federation: LocalFederation, experiment_id: str) -> list[str]:
    """Result messages the hub applied (not refused, not duplicates), from its audit log."""
    entries = map(json.loads, federation.hub_audit_log.read_text().splitlines())
    return [e["detail"]["case"] for e in entries
            if e["action"] == "message.received" and e["target"] == experiment_id
            and e["detail"].get("kind") == "result" and not e["detail"].get("duplicate")]


def hub_publish(federation: LocalFederation, message: Any) -> None:
    """Send a hub-signed message to a spoke's queue, as the hub does."""
    client = StompClient(BrokerSettings(host=federation.services.host,
                                        port=federation.services.broker_port,
                                        federation=federation.federation), "test-hub").start(30)
    try:
        client.publish(spoke_queue(message.spoke_id, federation.federation),
                       seal(message, SigningKey.load(federation.hub_key_path)),
                       {"tributary-kind": message.kind, "priority": "9"})
    finally:
        client.close()


def test_spoke_killed_mid_case_finishes_every_case_once(
        federation: LocalFederation, misbehaving_image: tuple[str, str]) -> None:
    """kill -9 of the spoke while its containers run: on restart the orphans are removed,
    the interrupted cases run again, and the hub accepts exactly one result per case."""
    spoke_id, config = add_spoke(federation, "crash", cases=2, concurrency=2)
    algorithm_id = register(federation, misbehaving_image, spoke_id)
    spoke = federation.start_spoke(spoke_id, config)
    experiment_id = launch(federation, spoke_id, algorithm_id, {"behaviour": "slow",
                                                                "seconds": 6})
    wait_for(lambda: containers(spoke_id, running_only=True), 120, "running container")
    spoke.popen.send_signal(signal.SIGKILL)
    spoke.popen.wait()
    orphans = {c.id for c in containers(spoke_id)}
    assert orphans, "the killed spoke should have left its container behind"

    federation.start_spoke(spoke_id, config)
    experiment = federation.wait_for_experiment(experiment_id, timeout=180)

    assert experiment["targets"][0]["state"] == "completed"
    cases = hub_cases(federation, experiment_id)
    assert [c["state"] for c in cases] == ["succeeded", "succeeded"], cases
    assert all(c["attempt"] == 1 and custody_attempt(federation, c) == 1 for c in cases)
    assert sorted(accepted_results(federation, experiment_id)) == sorted(
        c["case_id"] for c in cases), "each case exactly one accepted result"
    assert not orphans & {c.id for c in containers(spoke_id)}, "orphan left behind"
    removed = {e["detail"]["container_id"]
               for e in audit_entries(config, "container.orphan_removed")}
    assert orphans <= removed
    assert audit_entries(config, "case.interrupted")


def test_killed_container_fails_clearly_and_retry_runs_a_new_attempt(
        federation: LocalFederation, misbehaving_image: tuple[str, str]) -> None:
    """docker kill of one algorithm container: that case fails as ``killed`` (never retried
    on its own), the other succeeds; the hub's retry runs attempt 2, signed as such."""
    spoke_id, config = add_spoke(federation, "dkill", cases=2, concurrency=2)
    algorithm_id = register(federation, misbehaving_image, spoke_id)
    federation.start_spoke(spoke_id, config)
    experiment_id = launch(federation, spoke_id, algorithm_id, {"behaviour": "slow",
                                                                "seconds": 5})
    running = wait_for(lambda: [c for c in containers(spoke_id, running_only=True)], 120,
                       "running container")
    victim = running[0]
    killed_case = victim.labels["org.tributary.case-id"]
    victim.kill()

    federation.wait_for_experiment(experiment_id, timeout=180)
    cases = {c["case_id"]: c for c in hub_cases(federation, experiment_id)}
    assert cases[killed_case]["state"] == "failed"
    failure = cases[killed_case]["failure"]
    assert failure["reason"] == "killed" and failure["exit_code"] == 137
    assert "SIGKILL" in failure["detail"] and "outside the spoke" in failure["detail"]
    others = [c for case_id, c in cases.items() if case_id != killed_case]
    assert [c["state"] for c in others] == ["succeeded"]

    hub_publish(federation, RetryCasesMessage(
        experiment_id=experiment_id, spoke_id=spoke_id, case_ids=[killed_case], attempt=2,
        reason="container was killed"))
    retried = wait_for(lambda: [c for c in hub_cases(federation, experiment_id)
                                if c["case_id"] == killed_case and c["attempt"] == 2
                                and c["state"] == "succeeded"], 120, "retried result")[0]
    assert custody_attempt(federation, retried) == 2
    assert audit_entries(config, "cases.retry")[0]["detail"]["queued"] == [killed_case]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A broker of our own, to kill: never the shared one other test runs use."""
    from importlib import resources

    port = _free_port()
    base = tmp_path / "activemq"
    (base / "conf").mkdir(parents=True)
    template = resources.files("tributary.services").joinpath("activemq.xml").read_text()
    config = base / "conf" / "activemq.xml"
    config.write_text(template.replace("@HOST@", "127.0.0.1").replace("@PORT@", str(port)))
    broker_service.start_instance(base, config, "127.0.0.1", port)
    yield base, port
    broker_service.stop_instance(base)


def test_results_made_while_the_broker_is_down_arrive_after_it_returns(
        tmp_path: Path, service_settings: ServiceSettings, misbehaving_image: tuple[str, str],
        private_broker: tuple[Path, int]) -> None:
    """The broker is killed while cases run; they finish into the outbox; the spoke is
    killed and restarted while the broker is still down; when the broker returns, every
    result reaches the hub, in chain order, once."""
    base, port = private_broker
    federation = LocalFederation(
        tmp_path / "fed", services=service_settings.model_copy(update={"broker_port": port}))
    try:
        federation.start_hub()
        spoke_id, config = add_spoke(federation, "offline", cases=2, concurrency=2)
        algorithm_id = register(federation, misbehaving_image, spoke_id)
        federation.start_spoke(spoke_id, config)
        experiment_id = launch(federation, spoke_id, algorithm_id, {"behaviour": "slow",
                                                                    "seconds": 4})
        wait_for(lambda: containers(spoke_id, running_only=True), 120, "running container")
        pid = int((base / "broker.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # the broker dies without a goodbye
        wait_for(lambda: len(audit_entries(config, "container.finished")) == 2, 120,
                 "both cases finished", every=0.5)
        time.sleep(1)
        assert not audit_entries(config, "result.published"), "the broker was down"
        assert hub_cases(federation, experiment_id) == [] or all(
            c["state"] != "succeeded" for c in hub_cases(federation, experiment_id))
        # The outbox is durable: the spoke dies too, and starts again before the broker.
        spoke = federation.processes[f"spoke-{spoke_id}"]
        spoke.popen.send_signal(signal.SIGKILL)
        spoke.popen.wait()
        restarted = federation.start_spoke(spoke_id, config)
        wait_for(lambda: len(audit_entries(config, "spoke.started")) == 2, 30, "restart")
        # What the site's IT sees meanwhile: the agent is up, the results wait to be sent.
        waiting = spoke_status(config)
        assert waiting["agent"] == {"running": True, "pid": restarted.popen.pid}
        assert waiting["journal"]["outbox_unsent"] >= 2
        assert waiting["journal"]["cases"] == {"done": 2}

        broker_service.start_instance(base, base / "conf" / "activemq.xml", "127.0.0.1", port)
        experiment = federation.wait_for_experiment(experiment_id, timeout=180)
        wait_for(lambda: spoke_status(config)["journal"]["outbox_unsent"] == 0, 60,
                 "outbox drained")
        cases = hub_cases(federation, experiment_id)
        assert [c["state"] for c in cases] == ["succeeded", "succeeded"]
        assert len(accepted_results(federation, experiment_id)) == 2
        assert experiment["targets"][0]["state"] == "completed"
        published = audit_entries(config, "result.published")
        assert sorted(e["detail"]["case"] for e in published) == sorted(
            c["case_id"] for c in cases)
        assert len(audit_entries(config, "container.started")) == 2, "nothing ran twice"
    finally:
        federation.stop()


def spoke_status(config: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "tributary.cli", "spoke", "status", "-c",
                           str(config), "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class HubListener:
    """The results queue read as the hub reads it, verifying each spoke signature; keeps
    the bytes that crossed the broker too."""

    def __init__(self, federation: LocalFederation, spoke_id: str, key: SigningKey) -> None:
        self.bodies: list[bytes] = []
        self.messages: list[Any] = []
        self.key, self.spoke_id = key, spoke_id
        self.client = StompClient(BrokerSettings(
            host=federation.services.host, port=federation.services.broker_port,
            federation=federation.federation), "test-hub-listener").start(30)
        self.client.subscribe(results_queue(federation.federation), self._on)

    def _on(self, delivery: Delivery) -> None:
        body = delivery.body if isinstance(delivery.body, bytes) else delivery.body.encode()
        self.bodies.append(body)
        message, _ = open_from_spoke(body, lambda keyid: (
            (self.spoke_id, self.key.public) if keyid == self.key.keyid else None))
        self.messages.append(message)
        self.client.ack(delivery)

    def of(self, kind: type[T]) -> list[T]:
        return [m for m in self.messages if isinstance(m, kind)]

    def close(self) -> None:
        self.client.close()


def test_progress_heartbeats_and_cancellation(
        tmp_path: Path, service_settings: ServiceSettings,
        misbehaving_image: tuple[str, str]) -> None:
    """The spoke reports the algorithm's progress and its own heartbeat while a case runs;
    a cancellation stops the running container and drops the queued cases."""
    federation = LocalFederation(tmp_path / "fed", service_settings)
    hub_key = SigningKey.load_or_create(federation.hub_key_path)
    spoke_id, config = add_spoke(federation, "cancel", cases=3, concurrency=1,
                                 liveness="heartbeat_seconds = 1\nprogress_seconds = 0.5")
    spoke_key = SigningKey.load_or_create(config.parent / "spoke.key")
    listener = HubListener(federation, spoke_id, spoke_key)
    repository, digest = misbehaving_image
    experiment = ExperimentMessage(
        experiment_id=f"exp-{uuid.uuid4().hex[:8]}", spoke_id=spoke_id,
        algorithm=AlgorithmRef(name="misbehaving", version="1", repository=repository,
                               digest=digest, approval=sign_approval(
                                   hub_key, repository, digest, {"name": "misbehaving"})),
        arguments={"behaviour": "slow", "seconds": 120},
        limits=RunLimits(timeout_seconds=300, memory_mb=256))
    try:
        federation.start_spoke(spoke_id, config)
        hub_publish(federation, experiment)
        progress = wait_for(lambda: [p for p in listener.of(CaseProgressMessage)
                                     if p.fraction > 0], 120, "progress message")[0]
        assert progress.experiment_id == experiment.experiment_id and progress.attempt == 1
        assert progress.message == "measuring"
        sent = {e["detail"]["message_id"] for e in audit_entries(config, "progress.sent")}
        assert progress.message_id in sent  # audited by the spoke before it left
        beat = wait_for(lambda: [h for h in listener.of(HeartbeatMessage) if h.running],
                        30, "heartbeat with running work")[-1]
        assert beat.spoke_id == spoke_id and beat.concurrency == 1
        assert beat.queue_depth == 2 and beat.running[0].case_id == progress.case_id
        running = containers(spoke_id, running_only=True)
        assert len(running) == 1

        hub_publish(federation, CancelExperimentMessage(
            experiment_id=experiment.experiment_id, spoke_id=spoke_id, reason="wrong cohort"))
        status = wait_for(lambda: [s for s in listener.of(ExperimentStatusMessage)
                                   if s.state == "cancelled"], 60, "cancelled status")[0]
        results = listener.of(ResultMessage)
        assert [(r.case_id, r.status, r.failure.reason) for r in results] == [
            (progress.case_id, "failed", "cancelled")]
        accepted = next(s for s in listener.of(ExperimentStatusMessage)
                        if s.state == "accepted")
        assert sorted(status.case_ids) == sorted(set(accepted.case_ids) - {progress.case_id})
        assert status.reason == "wrong cohort"
        assert not containers(spoke_id), "the running container must be gone"
        assert audit_entries(config, "experiment.cancel")[0]["detail"]["stopping"] == [
            progress.case_id]
        after = wait_for(lambda: [h for h in listener.of(HeartbeatMessage)
                                  if h.sent_at > status.sent_at], 30, "later heartbeat")[-1]
        assert after.running == [] and after.queue_depth == 0
    finally:
        federation.stop()
        listener.close()
