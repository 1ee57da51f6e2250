"""Federated training in real spoke agent processes (``tributary spoke run`` with
``[training] enabled``): each spoke takes part with its own enrolled key and its pinned hub
key, admits the training image as it admits a validation study's (the hub's approval and a
trusted publisher's release signature for exactly that digest, pulled from the registry by
digest), runs it with its own executor on its de-identified catalog, and binds each masked
update to its custody record. The hub's round loop runs in this process (as the demo's).

The hub's coordinator attaches the approved version from its own database to every
``RoundOpen``, built as a validation launch builds it. A spoke is killed with SIGKILL
mid-round three times, while its training container runs, after it sent its keys and shares
(before it masked; the module's own broker is killed with SIGKILL then too, and started
again) and after its masked upload, and restarted: every round ends with each contribution
counted exactly once. A forged approval, an untrusted publisher and a round past the site's
epsilon cap are each refused with a signed refusal naming the reason, audited on both
sides, the refusing spokes counted out at once, and nothing runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import docker
import numpy as np
import pytest
from sqlmodel import Session, select

from tributary.hub.db import make_engine
from tributary.hub.models import (
    Algorithm,
    AuditEvent,
    TrainingCustody,
    TrainingRound,
    TrainingStudy,
)
from tributary.hub.services import training
from tributary.hub.services.launch import algorithm_ref
from tributary.hub.training_coordinator import TrainingCoordinator
from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.objects import ObjectStore, round_update_key
from tributary.protocol.release import sign_approval, sign_release
from tributary.protocol.signing import SigningKey
from tributary.protocol.training import rounds as msg
from tributary.protocol.training.update import flatten, schema_of
from tributary.services import objectstore
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port
from tributary.spoke.training import open_state
from tributary.testbed.containerwatch import ContainerWatch
from tributary.testbed.federation import LocalFederation, build_and_push, generate_cohort
from tributary.testbed.private_broker import PrivateBroker
from tributary.testbed.training_demo import load_logreg
from tributary_algorithm.training import RoundConfig

pytestmark = pytest.mark.e2e
T = TypeVar("T")
#: Little noise (sigma 1e-4 per coordinate), so that a contribution counted twice or not
#: at all would show far above it in the aggregate.
CLIP, Z = 10.0, 1e-5
logreg = load_logreg()


def wait_for(probe: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.2)
    return value


def audit(config: Path, action: str) -> list[dict[str, Any]]:
    path = config.parent / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["action"] == action]


class PausingCoordinator(TrainingCoordinator):
    """The hub's coordinator unchanged (it attaches the approved version from its database
    to every ``RoundOpen`` itself), holding one kind of message to one spoke at a gate so
    the test can kill that spoke at a known point."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate: tuple[str, type, int] | None = None  # (spoke, message type, round)
        self.reached, self.release = threading.Event(), threading.Event()

    def _send(self, receiver: str, message: msg.TrainingFromHub) -> None:
        gate = self.gate
        if gate is not None and receiver == gate[0] and isinstance(message, gate[1]):
            with Session(self.engine) as session:
                row = session.exec(select(TrainingRound).where(
                    TrainingRound.round_id == _round_id(message))).one()
            if row.round_index == gate[2]:
                self.reached.set()
                assert self.release.wait(300), "the test never opened the gate"
                self.gate = None
                self.reached.clear()
                self.release.clear()
        super()._send(receiver, message)


def _round_id(message: msg.TrainingFromHub) -> str:
    inner = {msg.Keys: lambda m: m.keys, msg.Delivery: lambda m: m.delivery,
             msg.Consistency: lambda m: m.request, msg.Unmask: lambda m: m.request}
    return inner[type(message)](message).round_id


@pytest.fixture(scope="module")
def image(service_settings: ServiceSettings) -> tuple[str, str]:
    from tributary.testbed.federation import examples_dir

    return build_and_push(examples_dir() / "federated_logreg", "federated-logreg",
                          uuid.uuid4().hex[:8], service_settings)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory,
           service_settings: ServiceSettings) -> Iterator[PrivateBroker]:
    """A broker of this module's own: the kill test kills it with SIGKILL."""
    broker = PrivateBroker(tmp_path_factory.mktemp("activemq"), service_settings.host).start()
    yield broker
    broker.stop()


@pytest.fixture
def setup(tmp_path: Path, service_settings: ServiceSettings, image: tuple[str, str],
          broker: PrivateBroker) -> Iterator[dict[str, Any]]:
    suffix = uuid.uuid4().hex[:6]
    spokes = [f"tr-{c}-{suffix}" for c in "abc"]
    store = ServiceSettings(state_dir=tmp_path / "os", host="127.0.0.2",
                            objectstore_port=free_port("127.0.0.2"))
    objectstore.write_identities(store, spokes, federation="training-agent-e2e")
    assert objectstore.ensure_running(store) in ("started", "running")
    federation = LocalFederation(tmp_path / "fed", service_settings.model_copy(
        update={"broker_port": broker.port}))
    hub_key = SigningKey.load_or_create(federation.hub_key_path)
    publisher = SigningKey.generate()
    publisher_pem = federation.root / "publisher.pem"
    publisher_pem.write_text(publisher.public.pem)
    configs, keys = {}, {}
    for n, spoke in enumerate(spokes):
        data = federation.root / "data" / spoke
        generate_cohort(data, 8, seed=100 + n, site=f"Site {n}", size=64, slices=16, scanner=n)
        config = federation.spoke_config(spoke, data, publisher_keys=(publisher_pem,))
        creds = objectstore.write_party_credentials(store, spoke)
        config.write_text(config.read_text() + (
            f'\n[training]\nenabled = true\nobjectstore_credentials = "{creds}"\n'
            'label_attributes = ["nodule_count"]\ntimeout_seconds = 300\nmemory_mb = 512\n'))
        configs[spoke], keys[spoke] = config, SigningKey.load_or_create(
            config.parent / "spoke.key")
        federation.start_spoke(spoke, config)
    repository, digest = image
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    with Session(engine) as session:  # registered and approved, as the review rule leaves it
        approved = algorithm_ref(register(session, "federated-logreg", repository, digest,
                                          publisher, hub_key))
        session.commit()
    client = StompClient(BrokerSettings(host=broker.host, port=broker.port,
                                        federation=federation.federation),
                         "hub-training").start(wait=30)
    hub_store = ObjectStore.from_file(objectstore.write_party_credentials(store, "hub"))
    coordinator = PausingCoordinator(engine, client, hub_store, hub_key,
                                     {s: k.public for s, k in keys.items()},
                                     federation.federation)
    coordinator.start()
    try:
        yield {"spokes": spokes, "configs": configs, "keys": keys, "federation": federation,
               "coordinator": coordinator, "engine": engine, "approved": approved,
               "hub_key": hub_key, "publisher": publisher, "hub_store": hub_store,
               "broker": broker}
    finally:
        client.close()
        federation.stop()
        objectstore.stop(store)


def register(session: Session, name: str, repository: str, digest: str,
             publisher: SigningKey, approver: SigningKey) -> Algorithm:
    """A version in the hub's database with its publisher's release signature and the
    approval of ``approver`` (the hub's key; another key: a forged approval)."""
    algorithm = Algorithm(
        name=name, version="1", repository=repository, digest=digest, publisher="Pub",
        release_signature=sign_release(publisher, repository, digest, name, "1", "Pub"),
        approval=sign_approval(approver, repository, digest, {"name": name}))
    session.add(algorithm)
    session.flush()
    return algorithm


def launch(engine: Any, algorithm_id: int, spokes: list[str], rounds: int,
           deadline: float = 240, max_attempts: int = 3) -> str:
    with Session(engine) as session:
        study = training.launch(session, training.StudySpec(
            name="nodules", algorithm_id=algorithm_id, spokes=spokes, rounds=rounds,
            min_participants=2, round_deadline_s=deadline, max_attempts=max_attempts,
            clip_bound=CLIP, noise_multiplier=Z, epsilon_budget=1e12, delta=1e-5,
            initial_model="sha256:" + "0" * 64), "test")
        session.commit()
        return study.id


def run_in_background(coordinator: TrainingCoordinator, study_id: str,
                      timeout: float) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            initial = {"weights": np.zeros(len(logreg.FEATURES)), "bias": np.zeros(1)}
            out["study"], out["final"] = coordinator.run(study_id, initial, timeout_s=timeout)
        except BaseException as exc:  # reported by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def released_digest(config: Path, round_id: str) -> str:
    """The digest a spoke's audit log says it released (and bound to custody) in a round."""
    entries = [e for e in audit(config, "training.masked_released") if e["target"] == round_id]
    assert len(entries) == 1, entries
    return str(entries[0]["detail"]["digest"])


def training_containers(spoke: str, study_id: str) -> list[Any]:
    client = docker.from_env()
    try:
        return client.containers.list(filters={"label": [
            f"org.tributary.spoke={spoke}", f"org.tributary.training={study_id}"]})
    finally:
        client.close()


def kill_and_restart(federation: LocalFederation, spoke: str, config: Path) -> None:
    process = federation.processes[f"spoke-{spoke}"]
    os.kill(process.popen.pid, signal.SIGKILL)
    process.popen.wait(30)
    federation.start_spoke(spoke, config)


def test_training_in_spoke_agents_survives_kill_9(setup: dict[str, Any]) -> None:
    spokes, configs, federation = setup["spokes"], setup["configs"], setup["federation"]
    coordinator, engine = setup["coordinator"], setup["engine"]
    victim = spokes[0]
    study_id = launch(engine, 1, spokes, rounds=3)
    # Round 0: the victim is killed while its training container runs (paused here, so it
    # is surely still there): the restarted spoke removes it and trains again.
    coordinator.gate = (victim, msg.Delivery, 1)
    thread, out = run_in_background(coordinator, study_id, timeout=900)
    container = wait_for(lambda: training_containers(victim, study_id), 300,
                         "the victim's training container")[0]
    container.pause()
    kill_and_restart(federation, victim, configs[victim])
    # Round 1: the victim has sent its keys and shares; killed before it masks.
    assert coordinator.reached.wait(300), (out, coordinator.refused)
    with Session(engine) as session:
        row = session.exec(select(TrainingRound).where(TrainingRound.round_index == 1)).one()
        assert row.stage == "masked"  # everyone's shares are in; no masked input yet
    # The broker too, killed with SIGKILL in the same round (the other two are masking or
    # have answered; what it holds is what it had written to disk), and started again.
    setup["broker"].kill()
    kill_and_restart(federation, victim, configs[victim])
    setup["broker"].start()
    coordinator.release.set()
    # Round 2: the victim has uploaded its masked vector (the hub has its announcement);
    # killed before the consistency check and the unmasking.
    wait_for(lambda: coordinator.gate is None, 60, "round 1's gate to open")
    coordinator.gate = (victim, msg.Consistency, 2)
    assert coordinator.reached.wait(300), (out, coordinator.refused)
    with Session(engine) as session:
        row = session.exec(select(TrainingRound).where(TrainingRound.round_index == 2)).one()
        assert victim in row.secagg.get("masked", {})
    kill_and_restart(federation, victim, configs[victim])
    coordinator.release.set()
    thread.join(600)
    assert "error" not in out, (out, coordinator.refused)
    assert out["study"].state == "finished", (out["study"], coordinator.refused)
    assert coordinator.refused == []

    with Session(engine) as session:
        rows = session.exec(select(TrainingRound).where(TrainingRound.study_id == study_id)
                            .order_by(TrainingRound.round_index)).all()
        # Each round aggregated at its first attempt with all three, none dropped.
        assert [(r.round_index, r.attempt, r.stage) for r in rows] == [
            (i, 1, "aggregated") for i in range(3)]
        for r in rows:
            assert sorted(r.num_examples) == sorted(spokes)
            assert sorted(r.secagg["masked"]) == sorted(spokes)
        last = rows[-1]
        num_examples = dict(last.num_examples)

    # The victim's own record: one join, one released masked update and one privacy
    # charge per round, whatever the restarts; its custody records chain 1, 2.
    config = configs[victim]
    assert len(audit(config, "training.joined")) == 3
    released = audit(config, "training.masked_released")
    assert [e["detail"]["custody_sequence"] for e in released] == [1, 2, 3]
    assert len(audit(config, "spoke.started")) == 4
    assert [e["target"] for e in audit(config, "container.orphan_removed")] == [container.name]
    assert len([e for e in audit(config, "container.started")
                if e["detail"]["round"] == 0]) == 2  # trained again after the restart
    work = config.parent
    state = open_state((work / "training.journal").read_bytes(),
                       (work / "training-journal.key").read_bytes())
    assert len(state.ledgers[study_id].charges) == 3
    assert state.rounds == {} and len(state.finished) == 3
    # Every spoke ran the image through its own executor, verified, by digest.
    for spoke in spokes:
        verified = audit(configs[spoke], "image.verified")
        assert verified and all(e["detail"]["result"] == "verified" for e in verified)
        started = audit(configs[spoke], "container.started")
        assert started and all(e["detail"]["limits"]["network"] == "none" for e in started)

    # Counted once: the applied step is the sample-weighted FedAvg of the three updates
    # (recomputed here), and far from what a doubled or a missing victim would give.
    global_in = coordinator.global_model_at(study_id, last.round_index)
    final = out["final"]
    schema = schema_of(global_in)
    biggest = max(num_examples.values())
    reals = {}
    for spoke in spokes:
        trained, count, _ = logreg.NoduleClassifier().fit(
            global_in, logreg.cohort_data(federation.root / "data" / spoke),
            RoundConfig(round=last.round_index + 1))
        assert count == num_examples[spoke]
        reals[spoke] = (flatten(trained, schema) - flatten(global_in, schema)) * (count / biggest)
    weights = sum(c / biggest for c in num_examples.values())
    applied = flatten(final, schema) - flatten(global_in, schema)
    once = sum(reals.values()) / weights
    doubled = (sum(reals.values()) + reals[victim]) / (weights + num_examples[victim] / biggest)
    without = (sum(reals.values()) - reals[victim]) / (weights - num_examples[victim] / biggest)
    error = np.linalg.norm(applied - once)
    assert error < 0.01, (applied, once)
    assert error < 0.2 * np.linalg.norm(applied - doubled), (applied, once, doubled)
    assert error < 0.2 * np.linalg.norm(applied - without), (applied, once, without)

    # The masked objects the hub summed are the ones the spokes' custody records name.
    hub_store = setup["hub_store"]
    for spoke in spokes:
        key = round_update_key(spoke, last.round_index, f"{last.round_id}.masked")
        digest = "sha256:" + hashlib.sha256(hub_store.get(key)).hexdigest()
        assert released_digest(configs[spoke], last.round_id) == digest
    # The hub kept each spoke's custody chain, 1, 2, 3, whatever the kills and
    # redeliveries, and refused none of it.
    with Session(engine) as session:
        kept = session.exec(select(TrainingCustody).order_by(TrainingCustody.id)).all()
        for spoke in spokes:
            assert [k.sequence for k in kept if k.spoke_id == spoke] == [1, 2, 3]
        assert session.exec(select(AuditEvent).where(
            AuditEvent.action == "training.custody_refused")).all() == []


def test_unapproved_or_forged_images_and_the_epsilon_cap_are_refused(
        setup: dict[str, Any]) -> None:
    """The hub sends what its database holds: a version whose approval was forged (not by
    the spokes' pinned hub key) and one released by a publisher the sites do not trust are
    refused by the spokes themselves, each with the reason; a site's epsilon cap refuses
    first. Two studies at once; nothing runs anywhere."""
    spokes, configs, federation = setup["spokes"], setup["configs"], setup["federation"]
    coordinator, engine, approved = setup["coordinator"], setup["engine"], setup["approved"]
    # The first site caps what it spends on a study far below what one round costs here.
    capped = spokes[0]
    federation.processes[f"spoke-{capped}"].stop()
    configs[capped].write_text(configs[capped].read_text().replace(
        "[training]\n", "[training]\nmax_epsilon_per_study = 1.0\n"))
    federation.start_spoke(capped, configs[capped])
    stranger = SigningKey.generate()
    with Session(engine) as session:
        # an "approval" signed by a key that is not the pinned hub's
        forged = register(session, "forged-approval", approved.repository, approved.digest,
                          setup["publisher"], stranger).id
        # approved by the hub, but released by a publisher no site trusts
        untrusted = register(session, "untrusted-release", approved.repository,
                             approved.digest, stranger, setup["hub_key"]).id
        session.commit()
    # A long deadline: each refusal counts its spoke out at once, so the attempt ends as
    # soon as the three refused, long before it.
    studies = {launch(engine, forged, spokes, rounds=1, deadline=240, max_attempts=1):
               ("image_not_trusted", "approval"),
               launch(engine, untrusted, spokes, rounds=1, deadline=240, max_attempts=1):
               ("image_not_trusted", "release signature")}
    watches = [ContainerWatch(f"org.tributary.training={s}").start() for s in studies]
    runs = [run_in_background(coordinator, study_id, timeout=300) for study_id in studies]
    for thread, out in runs:
        thread.join(300)
        assert "error" not in out, out
        assert out["study"].state == "failed"
    assert [watch.stop() for watch in watches] == [[], []]  # nothing ran
    with Session(engine) as session:
        refusals = session.exec(select(AuditEvent).where(
            AuditEvent.action == "training.spoke_refused")).all()
        for study_id, (reason, words) in studies.items():
            by_spoke = {e.detail["spoke"]: e.detail for e in refusals
                        if e.detail["study"] == study_id}
            assert sorted(by_spoke) == sorted(spokes)
            assert by_spoke[capped]["reason"] == "epsilon_cap", by_spoke[capped]
            assert "over this site's cap 1.0" in by_spoke[capped]["detail"]
            for spoke in spokes[1:]:
                assert by_spoke[spoke]["reason"] == reason, by_spoke[spoke]
                assert words in by_spoke[spoke]["detail"], by_spoke[spoke]
            assert session.get(TrainingStudy, study_id).state == "failed"
            row = session.exec(select(TrainingRound).where(
                TrainingRound.study_id == study_id)).one()
            assert row.refused == {capped: "epsilon_cap", **{s: reason for s in spokes[1:]}}
            assert (row.closed_at - row.opened_at).total_seconds() < 120, row
            counted_out = session.exec(select(AuditEvent).where(
                AuditEvent.action == "training.spoke_counted_out",
                AuditEvent.target == row.round_id)).all()
            assert sorted(e.detail["spoke"] for e in counted_out) == sorted(spokes)
    for study_id, (reason, _words) in studies.items():
        for spoke in spokes:
            refused = [e for e in audit(configs[spoke], "training.refused")
                       if e["target"] == study_id]
            assert refused and refused[0]["detail"]["reason"] == (
                "epsilon_cap" if spoke == capped else reason)
    for spoke in spokes[1:]:
        assert sum(e["detail"]["result"] == "refused"
                   for e in audit(configs[spoke], "image.verified")) == 2
