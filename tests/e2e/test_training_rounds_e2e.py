"""A training study end to end: the hub's round loop and three spokes' training agents
talk only through the real ActiveMQ broker (every message signed), global models and
masked updates live in a real SeaweedFS (each spoke with credentials that write only its
own objects), and each spoke runs the federated example image in Docker by its digest.
The federated model is compared on a held-out set with the same model trained centrally,
and what the hub stored for a round is shown to give no single spoke's update."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from sqlmodel import Session, select

from tributary.hub.db import make_engine
from tributary.hub.models import AuditEvent, TrainingRound, TrainingStudy
from tributary.hub.services import training
from tributary.hub.training_coordinator import TrainingCoordinator
from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.objects import ObjectStore, ObjectStoreRefused, round_update_key
from tributary.protocol.signing import SigningKey
from tributary.protocol.training.secagg import vector_from_bytes
from tributary.protocol.training.update import dequantise_sum, flatten, schema_of
from tributary.services import objectstore
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port
from tributary.spoke.training_agent import DockerTrainer, TrainingAgent
from tributary.testbed.federation import generate_cohort
from tributary_algorithm.tools import build_image
from tributary_algorithm.tools.localrun import participant_for_series
from tributary_algorithm.tools.localtrain import SiteCase, TrainingSite
from tributary_algorithm.training import RoundConfig

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "examples" / "federated_logreg"
BASE_IMAGE = "tributary/python-base:3.11"
TAG = "tributary-test/federated-logreg:e2e"
SPOKES = ["site-a", "site-b", "site-c"]
ROUNDS = 4
#: Federated accuracy on the held-out set within this much of centralised.
ACCURACY_TOLERANCE = 0.1
CLIP, Z = 10.0, 0.002  # sigma = 0.02 per coordinate per spoke


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


logreg = _load("federated_logreg_e2e", EXAMPLE_DIR / "logreg.py")


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed")
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE],
                      capture_output=True, timeout=60).returncode != 0:
        pytest.skip(f"base image {BASE_IMAGE} is not built (no Docker Hub here)")
    build_image(EXAMPLE_DIR, TAG, base_image=BASE_IMAGE)
    return subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", TAG],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def store_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceSettings]:
    state = tmp_path_factory.mktemp("os")
    settings = ServiceSettings(state_dir=state, host="127.0.0.2",
                               objectstore_port=free_port("127.0.0.2"))
    objectstore.write_identities(settings, SPOKES, federation="training-e2e")
    assert objectstore.ensure_running(settings) in ("started", "running")
    yield settings
    objectstore.stop(settings)


def _site(folder: Path) -> TrainingSite:
    truth = json.loads((folder / "ground_truth.json").read_text())
    cases = tuple(
        SiteCase(f"c-{i:016x}", participant_for_series([folder / name], f"c-{i:016x}"),
                 {"nodule_count": len(truth[name]["nodules"])})
        for i, name in enumerate(sorted(truth)))
    return TrainingSite(folder.name, cases)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohorts")
    for n in range(3):  # each site its own scanner (non-IID); the test set mixes all three
        generate_cohort(root / f"site{n}", 8, seed=100 + n, site=f"Site {n}", size=64,
                        slices=16, scanner=n)
        generate_cohort(root / f"test{n}", 4, seed=200 + n, site=f"Site {n}", size=64,
                        slices=16, scanner=n)
    return root


def test_a_training_study_over_broker_store_and_docker(
        image: str, store_settings: ServiceSettings, cohorts: Path,
        service_settings: ServiceSettings, tmp_path: Path) -> None:
    federation = f"tr{uuid.uuid4().hex[:8]}"
    broker = BrokerSettings(host=service_settings.host, port=service_settings.broker_port,
                            federation=federation)

    def store(party: str) -> ObjectStore:
        return ObjectStore.from_file(objectstore.write_party_credentials(store_settings, party))

    hub_key = SigningKey.generate()
    spoke_keys = {s: SigningKey.generate() for s in SPOKES}
    clients: list[StompClient] = []
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    hub_broker = StompClient(broker, "hub-training").start(wait=30)
    clients.append(hub_broker)
    hub_store = store("hub")
    coordinator = TrainingCoordinator(engine, hub_broker, hub_store, hub_key,
                                      {s: k.public for s, k in spoke_keys.items()}, federation)
    agents = []
    try:
        for n, s in enumerate(SPOKES):
            c = StompClient(broker, f"{s}-training").start(wait=30)
            clients.append(c)
            trainer = DockerTrainer(image, _site(cohorts / f"site{n}"),
                                    {"timeout": 120, "memory_mb": 512})
            agent = TrainingAgent(s, c, store(s), spoke_keys[s], hub_key.public, trainer,
                                  federation, tmp_path / f"{s}.journal", os.urandom(32))
            agent.start()
            agents.append(agent)
        coordinator.start()
        with Session(engine) as session:
            study = training.launch(session, training.StudySpec(
                name="nodules", algorithm=image, spokes=SPOKES, rounds=ROUNDS,
                min_participants=3, round_deadline_s=120, clip_bound=CLIP,
                noise_multiplier=Z, epsilon_budget=1e12, delta=1e-5,
                initial_model="sha256:" + "0" * 64), "coordinator")
            session.commit()
            study_id = study.id
        initial = {"weights": np.zeros(len(logreg.FEATURES)), "bias": np.zeros(1)}
        study, final = coordinator.run(study_id, initial, timeout_s=300)
        assert study.state == "finished", (study.stop_reason, coordinator.refused,
                                           [a.refused for a in agents])
        assert coordinator.refused == [] and all(a.refused == [] for a in agents)

        result = logreg.compare([cohorts / f"site{n}" for n in range(3)],
                                [cohorts / f"test{n}" for n in range(3)], final, ROUNDS)
        fed, cen = result["federated"], result["centralised"]
        print("e2e training:", json.dumps(result))
        assert fed["accuracy"] >= 0.8, result
        assert abs(fed["accuracy"] - cen["accuracy"]) <= ACCURACY_TOLERANCE, result

        with Session(engine) as session:
            rows = session.exec(select(TrainingRound).order_by(TrainingRound.round_index)).all()
            assert [(r.round_index, r.stage, sorted(r.num_examples)) for r in rows] == [
                (i, "aggregated", SPOKES) for i in range(ROUNDS)]
            eps = [r.epsilon_cumulative for r in rows]
            assert eps == sorted(eps) and eps[0] > 0
            assert len(session.exec(select(AuditEvent).where(
                AuditEvent.action == "training.round_aggregated")).all()) == ROUNDS
            stored = json.dumps([r.model_dump(mode="json") for r in rows])
            last = rows[-1]
            q = training.quantisation_for(session.get(TrainingStudy, study_id), 3)
        # The hub's rows hold digests and locations, never a vector; each stored masked
        # vector on its own is nowhere near that spoke's real update (recomputed here).
        assert "weights" not in stored
        global_in = coordinator.history[study_id][last.round_index]
        schema = schema_of(global_in)
        reals = []
        for n, s in enumerate(SPOKES):
            trained, count, _ = logreg.NoduleClassifier().fit(
                global_in, logreg.cohort_data(cohorts / f"site{n}"),
                RoundConfig(round=last.round_index + 1))
            real = (flatten(trained, schema) - flatten(global_in, schema)) * (
                count / max(last.num_examples.values()))
            key = round_update_key(s, last.round_index, f"{last.round_id}.masked")
            vector = vector_from_bytes(hub_store.get(key), 32, schema.size)
            assert np.linalg.norm(dequantise_sum(vector, q, 1) - real) > 1.0
            reals.append(real)
        # ...while their sum, unmasked by the hub, is the weighted FedAvg step (within noise).
        weights = sum(c / max(last.num_examples.values()) for c in last.num_examples.values())
        applied = flatten(final, schema) - flatten(global_in, schema)
        assert np.max(np.abs(applied - np.sum(reals, axis=0) / weights)) < 0.1
        # A spoke can write only its own round objects.
        with pytest.raises(ObjectStoreRefused):
            store("site-a").put(round_update_key("site-b", 0, "forged.masked"), b"x")
    finally:
        for c in clients:
            c.close()
