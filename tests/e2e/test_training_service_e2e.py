"""Training as a hub service: a real hub process (`tributary hub serve`, the training loop
in the web app, or beside it as `tributary hub train`) with its own signing key, the
spokes' keys from its enrolment tables, the real broker and a real SeaweedFS. A coordinator
launches the study with `tributary training launch` (a spoke that is not enrolled is
refused with the reason); three spokes' training agents run in this process on the
federated example image in Docker. The hub (all its processes) is killed with SIGKILL in
round 0 after two spokes joined, and in round 1 after two sent their masked input, each
time started again: the study completes, each round aggregated once with each spoke's
contribution counted once (rows, privacy ledgers, and the applied step of both killed
rounds against the plain weighted sum of the spokes' updates, recomputed here); `tributary
training watch` exits 0. The study runs FedAdam on the hub: each round's step is Adam's from
the moments the previous round stored, across the kills."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from sqlmodel import Session, select

from tributary.hub.db import make_engine
from tributary.hub.models import AuditEvent, TrainingRound, TrainingStudy
from tributary.hub.services import training, training_optimiser
from tributary.hub.services.server_optimisers import ServerOptimiser, step
from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.objects import ObjectStore
from tributary.protocol.signing import SigningKey
from tributary.protocol.training.tensors import decode_tensors, encode_tensors
from tributary.protocol.training.update import flatten, schema_of
from tributary.services import objectstore, redis
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port
from tributary.spoke.training_agent import DockerTrainer, TrainingAgent
from tributary.testbed.training_demo import (
    load_logreg,
    make_cohorts,
    site_of,
)
from tributary.testbed.training_hub import TRIBUTARY, TrainingHub
from tributary_algorithm.training import RoundConfig

pytestmark = pytest.mark.e2e

SPOKES = ["site-a", "site-b", "site-c"]
ROUNDS = 3
FEDADAM = ServerOptimiser(kind="fedadam", server_lr=0.05)
logreg = load_logreg()


@pytest.fixture(scope="module")
def image(training_image: tuple[str, str]) -> tuple[str, str]:
    """The example pushed to the registry (repository, digest)."""
    return training_image


@pytest.fixture(scope="module")
def store_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceSettings]:
    settings = ServiceSettings(state_dir=tmp_path_factory.mktemp("os"), host="127.0.0.2",
                               objectstore_port=free_port("127.0.0.2"))
    objectstore.write_identities(settings, SPOKES, federation="training-service")
    assert objectstore.ensure_running(settings) in ("started", "running")
    yield settings
    objectstore.stop(settings)


class HeldStore(ObjectStore):
    """A spoke's real store whose write of its round-1 masked vector waits for the test."""

    held = threading.Event()
    release = threading.Event()

    def put(self, key: str, data: bytes) -> None:
        if "-r1-" in key:
            HeldStore.held.set()
            HeldStore.release.wait(300)
        super().put(key, data)


def cli(hub: TrainingHub, token: str, *args: str, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRIBUTARY, "training", *args, "--hub", hub.url, "--token", token],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})


def wait_for(what: str, condition, timeout: float = 180.0,
             hub: TrainingHub | None = None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}" + ("\n" + hub.log() if hub else ""))


@pytest.mark.parametrize("apart", [False, True], ids=["in-web-app", "hub-train"])
def test_hub_killed_mid_round_resumes_and_counts_each_spoke_once(
        image: tuple[str, str], store_settings: ServiceSettings,
        service_settings: ServiceSettings,
        tmp_path: Path, apart: bool) -> None:
    HeldStore.held.clear()
    HeldStore.release.clear()
    federation = f"th{uuid.uuid4().hex[:8]}"
    cohorts = make_cohorts(tmp_path / "cohorts")
    # Apart, the rounds are also closed by a Celery worker (redis), killed with the hub, and
    # the web app runs the round loop too: two loops on one database, one leads at a time.
    hub = TrainingHub(tmp_path / "hub", service_settings.host, service_settings.broker_port,
                      federation, objectstore.write_party_credentials(store_settings, "hub"),
                      apart=apart, web_app_training=apart or None,
                      celery_broker_url=redis.ensure_running(service_settings)
                      if apart else None)
    hub_key, database = hub.key, hub.database_url
    broker = BrokerSettings(host=service_settings.host, port=service_settings.broker_port,
                            federation=federation)
    spoke_keys = {s: SigningKey.generate() for s in SPOKES}
    agents: dict[str, TrainingAgent] = {}
    clients: list[StompClient] = []

    def start_agent(n: int, spoke: str, store_class: type[ObjectStore] = ObjectStore) -> None:
        client = StompClient(broker, f"{spoke}-training").start(wait=30)
        clients.append(client)
        store = store_class.from_file(objectstore.write_party_credentials(store_settings, spoke))
        trainer = DockerTrainer("@".join(image), site_of(cohorts / f"site{n}"),
                                {"timeout": 120, "memory_mb": 512})
        agents[spoke] = TrainingAgent(spoke, client, store, spoke_keys[spoke], hub_key.public,
                                      trainer, federation, tmp_path / f"{spoke}.journal",
                                      b"k" * 32, release_loss=True)
        agents[spoke].start()

    hub.start()
    try:
        token = hub.sign_in()
        with hub.api(token) as api:
            for spoke, key in spoke_keys.items():  # the federation's enrolment, via the API
                hub.enrol(api, spoke, key)
            algorithm_id = hub.register_approved(api, "federated-logreg", *image,
                                                 SigningKey.generate())
        model = tmp_path / "initial.safetensors"
        save_file({"weights": np.zeros(len(logreg.FEATURES)), "bias": np.zeros(1)}, str(model))
        settings = tmp_path / "study.json"
        settings.write_text(json.dumps({
            "name": "nodules", "algorithm_id": algorithm_id, "rounds": ROUNDS,
            "min_participants": 3, "round_deadline_s": 300, "clip_bound": 10.0,
            "noise_multiplier": 0.002, "epsilon_budget": 1e12, "delta": 1e-5}))

        refused = cli(hub, token, "launch", "--file", str(settings), "--initial-model",
                      str(model), *[f"--spoke={s}" for s in [*SPOKES, "site-z"]])
        assert refused.returncode == 1 and "site-z" in refused.stderr \
            and "not registered" in refused.stderr, refused
        launched = cli(hub, token, "launch", "--file", str(settings), "--initial-model",
                       str(model), *[f"--spoke={s}" for s in SPOKES], "--strategy",
                       "fedadam", "--server-lr", str(FEDADAM.server_lr))
        assert launched.returncode == 0, launched.stderr
        study_id = launched.stdout.strip()

        engine = make_engine(database, migrate=False)

        def round_row(index: int) -> TrainingRound | None:
            with Session(engine) as session:
                return session.exec(select(TrainingRound).where(
                    TrainingRound.study_id == study_id,
                    TrainingRound.round_index == index)).first()

        start_agent(0, "site-a")
        start_agent(1, "site-b")  # site-c is offline for now
        wait_for("two spokes to join round 0",
                 lambda: (r := round_row(0)) is not None and len(r.num_examples) == 2, hub=hub)
        hub.kill()  # mid-round: two joined, one not; nothing of the hub's process is kept
        assert round_row(0).stage == "keys"
        start_agent(2, "site-c", HeldStore)  # its round-open waited in the broker; it joins
        hub.start()
        # Round 1: killed again in the masking stage, two masked inputs in, site-c's upload
        # held until the hub is down (keys and shares were routed by the hub before).
        wait_for("two masked inputs in round 1", lambda: HeldStore.held.is_set() and (
            r := round_row(1)) is not None and len(r.secagg.get("masked", {})) == 2, hub=hub)
        hub.kill()
        assert round_row(1).stage == "masked"
        HeldStore.release.set()
        hub.start()

        watched = cli(hub, token, "watch", study_id, "--interval", "1", "--timeout", "400",
                      timeout=450)
        assert watched.returncode == 0, (watched.stdout, watched.stderr, hub.logs()[-4000:])
        assert f"{study_id}: finished" in watched.stdout
        shown = json.loads(cli(hub, token, "show", study_id, "--json").stdout)
        listed = cli(hub, token, "list")
        assert study_id in listed.stdout and f"{ROUNDS}/{ROUNDS}" in listed.stdout
    finally:
        HeldStore.release.set()
        for agent in agents.values():
            agent.stop()
        for client in clients:
            client.close()
        hub.stop()

    if apart:  # two processes ran the round loop's service; one led per start...
        assert "training coordinator on" in (tmp_path / "hub" / "train-2.log").read_text()
        with Session(engine) as session:
            taken = session.exec(select(AuditEvent).where(
                AuditEvent.action == "training.loop_taken")).all()
        assert len(taken) == hub.starts == 3, [e.detail for e in taken]
        waited = [n for n in range(1, 4) for name in ("hub", "train")
                  if "waiting for its lease" in (tmp_path / "hub" / f"{name}-{n}.log"
                                                 ).read_text()]
        assert waited == [1, 2, 3], hub.logs()[-4000:]
        # ...and each round was closed by the worker, once (a second run finds it closed).
        closes = "".join((tmp_path / "hub" / f"worker-{n}.log").read_text()
                         for n in (1, 2, 3))
        closed = re.findall(r"aggregate_training_round\[[^]]+\] succeeded[^\n]*'(sha256:"
                            r"[0-9a-f]{64})'", closes)
        assert set(closed) == {r["global_model_out"] for r in shown["round_list"]}, closes
    assert shown["state"] == "finished" and shown["rounds_done"] == ROUNDS
    assert [(r["round"], r["attempt"], r["stage"], sorted(r["joined"]), r["survivors"],
             r["dropouts"]) for r in shown["round_list"]] == [
        (i, 1, "aggregated", SPOKES, SPOKES, []) for i in range(ROUNDS)]
    eps = [r["epsilon_cumulative"] for r in shown["round_list"]]
    assert eps == sorted(eps) and eps[-1] == shown["epsilon_spent"] > 0
    assert all(r["mean_loss"] is not None for r in shown["round_list"])

    with Session(engine) as session:
        study = session.get(TrainingStudy, study_id)
        rows = training.rounds_of(session, study_id)
        # Each spoke charged once per round: no round counted twice after the restart.
        assert {s: len(v["charges"]) for s, v in study.ledgers.items()} == dict.fromkeys(
            SPOKES, ROUNDS)
        aggregated = session.exec(select(AuditEvent).where(
            AuditEvent.action == "training.round_aggregated")).all()
        assert sorted(e.target for e in aggregated) == sorted(r.round_id for r in rows)
        # Each restart resumed the open round where it was, and said so.
        resumed = session.exec(select(AuditEvent).where(
            AuditEvent.action == "training.round_resumed").order_by(AuditEvent.id)).all()
        assert [(e.target, e.detail["stage"]) for e in resumed] == [
            (rows[0].round_id, "keys"), (rows[1].round_id, "masked")]
        assert (study.strategy, study.server_optimiser) == (
            "fedadam", FEDADAM.model_dump(mode="json"))
        assert all(r.optimiser_state_out for r in rows)

    # Rounds 0 and 1 (the killed ones): the hub's mean update (recovered from the first
    # moment it stored) is the plain weighted sum of the spokes' real updates (recomputed
    # here from their cohorts), within the noise, and the applied step is Adam's from the
    # moments the round before stored (round 1's were written before the second kill).
    store = ObjectStore.from_file(objectstore.write_party_credentials(store_settings, "hub"))
    for row in rows[:2]:
        global_in = decode_tensors(store.get(training.model_location(
            study_id, row.round_index, row.global_model_in)))
        global_out = decode_tensors(store.get(training.model_location(
            study_id, row.round_index + 1, row.global_model_out)))
        schema = schema_of(global_in)
        reference = max(row.num_examples.values())
        reals = []
        for n in range(len(SPOKES)):
            trained, count, _ = logreg.NoduleClassifier().fit(
                global_in, logreg.cohort_data(cohorts / f"site{n}"),
                RoundConfig(round=row.round_index + 1))
            reals.append((flatten(trained, schema) - flatten(global_in, schema))
                         * (count / reference))
        weights = sum(c / reference for c in row.num_examples.values())
        with Session(engine) as session:
            moments_in = training_optimiser.state_going_into(
                session, store, session.get(TrainingStudy, study_id), row.round_index,
                schema.size)
        assert moments_in.steps == row.round_index
        moments_out = training_optimiser.decode_state(store.get(
            training_optimiser.state_location(study_id, row.round_index + 1,
                                              row.optimiser_state_out)),
            row.optimiser_state_out, schema.size)
        m_in = moments_in.m if moments_in.m is not None else 0.0
        mean = (moments_out.m - FEDADAM.beta_1 * m_in) / (1 - FEDADAM.beta_1)
        assert np.max(np.abs(mean - np.sum(reals, axis=0) / weights)) < 0.1
        expected, moments = step(FEDADAM, flatten(global_in, schema), mean, moments_in)
        np.testing.assert_allclose(flatten(global_out, schema), expected, rtol=0, atol=1e-9)
        np.testing.assert_allclose(moments_out.v, moments.v, rtol=1e-9, atol=1e-15)
        applied = flatten(global_out, schema) - flatten(global_in, schema)
        assert np.linalg.norm(applied) > 0.01  # the step is real, not a stale model


@pytest.mark.parametrize("grace", [15.0, 0.0], ids=["grace", "no-grace"])
def test_a_deadline_that_passed_while_the_hub_was_down_waits_for_late_answers(
        image: tuple[str, str], store_settings: ServiceSettings,
        service_settings: ServiceSettings,
        tmp_path: Path, grace: float) -> None:
    """Killed in round 0's keys stage with two of three spokes in; the stage's deadline
    passes while the hub is down and the third spoke answers only after the restart. For
    its first seconds (TRIBUTARY_HUB_TRAINING_RESUME_GRACE_SECONDS) the restarted hub closes
    a stage only when everyone answered, so the round completes at its first attempt; with
    no grace it closes the stage at once, short of the minimum, and retries the round."""
    federation = f"tg{uuid.uuid4().hex[:8]}"
    cohorts = make_cohorts(tmp_path / "cohorts")
    hub = TrainingHub(tmp_path / "hub", service_settings.host, service_settings.broker_port,
                      federation, objectstore.write_party_credentials(store_settings, "hub"),
                      settings={"TRIBUTARY_HUB_TRAINING_RESUME_GRACE_SECONDS": str(grace)})
    broker = BrokerSettings(host=service_settings.host, port=service_settings.broker_port,
                            federation=federation)
    spoke_keys = {s: SigningKey.generate() for s in SPOKES}
    agents: list[TrainingAgent] = []
    clients: list[StompClient] = []

    def start_agent(n: int) -> None:
        spoke = SPOKES[n]
        client = StompClient(broker, f"{spoke}-training").start(wait=30)
        clients.append(client)
        store = ObjectStore.from_file(objectstore.write_party_credentials(store_settings, spoke))
        agent = TrainingAgent(spoke, client, store, spoke_keys[spoke], hub.key.public,
                              DockerTrainer("@".join(image), site_of(cohorts / f"site{n}"),
                                            {"timeout": 120, "memory_mb": 512}),
                              federation, tmp_path / f"{spoke}.journal", b"k" * 32)
        agent.start()
        agents.append(agent)

    engine = make_engine(hub.database_url)  # the schema, before the hub reads it
    hub.start()
    try:
        with hub.api(hub.sign_in()) as api:
            for spoke, key in spoke_keys.items():
                hub.enrol(api, spoke, key)
            algorithm_id = hub.register_approved(api, "federated-logreg", *image,
                                                 SigningKey.generate())
            initial = {"weights": np.zeros(len(logreg.FEATURES)), "bias": np.zeros(1)}
            launched = api.post("/api/training-studies", json={
                "name": "late", "algorithm_id": algorithm_id, "spokes": SPOKES, "rounds": 1,
                "min_participants": 3, "round_deadline_s": 20, "clip_bound": 10.0,
                "noise_multiplier": 0.002, "epsilon_budget": 1e12, "delta": 1e-5,
                "initial_model_b64": base64.b64encode(encode_tensors(initial)).decode()})
            assert launched.status_code == 201, launched.text
            study_id = launched.json()["id"]

            def first_row() -> TrainingRound | None:
                with Session(engine) as session:
                    return session.exec(select(TrainingRound).where(
                        TrainingRound.study_id == study_id)).first()

            start_agent(0)
            start_agent(1)
            row = wait_for("two joins", lambda: (r := first_row()) is not None
                           and len(r.num_examples) == 2 and r, hub=hub)
            hub.kill()
            assert first_row().stage == "keys"
            deadline = row.stage_deadline.replace(tzinfo=UTC)
            time.sleep(max(0.0, (deadline - datetime.now(UTC)).total_seconds()) + 1)
            hub.start()
            start_agent(2)  # answers only now, after the deadline
            study = hub.wait_for_end(api, study_id, timeout=300)
    finally:
        for agent in agents:
            agent.stop()
        for client in clients:
            client.close()
        hub.stop()
    assert study["state"] == "finished", (study, hub.logs()[-3000:])
    outcomes = [(r["round"], r["attempt"], r["stage"], sorted(r["joined"]))
                for r in study["round_list"]]
    if grace:
        assert outcomes == [(0, 1, "aggregated", SPOKES)]
    else:
        assert outcomes[0] == (0, 1, "retried", SPOKES[:2])
        assert outcomes[-1][2:] == ("aggregated", SPOKES)
