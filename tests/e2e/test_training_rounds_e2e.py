"""A training study end to end on the production path (what `tributary demo training`
runs): a hub process whose training service runs the rounds and three spoke agent
processes (`tributary spoke run`, ``[training]`` on, per-run keys enrolled at the hub) talk
only through the real ActiveMQ broker (every message signed); the training image is pushed
to the registry, registered and approved at the hub, and each spoke admits it (the hub's
approval, a trusted release signature), pulls it by digest and runs it with its own executor
on its de-identified catalog; global models and masked updates live in a real SeaweedFS
(each spoke with credentials that write only its own objects). The federated model is
compared on a held-out set with the same model trained centrally, and what the hub stored
for a round is shown to give no single spoke's update."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import Session, select

from tributary.hub.models import AuditEvent, TrainingRound, TrainingStudy
from tributary.hub.services import training
from tributary.protocol.objects import ObjectStoreRefused, round_update_key
from tributary.protocol.training.secagg import vector_from_bytes
from tributary.protocol.training.update import dequantise_sum, flatten, schema_of
from tributary.services import objectstore
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port
from tributary.testbed.training_demo import (
    load_logreg,
    run_training_demo,
)
from tributary_algorithm.training import RoundConfig

pytestmark = pytest.mark.e2e

SPOKES = ["site-a", "site-b", "site-c"]
ROUNDS = 4
#: Federated accuracy on the held-out set within this much of centralised.
ACCURACY_TOLERANCE = 0.1
CLIP, Z = 10.0, 0.002  # sigma = 0.02 per coordinate per spoke
logreg = load_logreg()


@pytest.fixture(scope="module")
def image(training_image: tuple[str, str]) -> tuple[str, str]:
    """The example pushed to the registry (repository, digest)."""
    return training_image


@pytest.fixture(scope="module")
def store_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceSettings]:
    state = tmp_path_factory.mktemp("os")
    settings = ServiceSettings(state_dir=state, host="127.0.0.2",
                               objectstore_port=free_port("127.0.0.2"))
    objectstore.write_identities(settings, SPOKES, federation="training-e2e")
    assert objectstore.ensure_running(settings) in ("started", "running")
    yield settings
    objectstore.stop(settings)


def test_a_training_study_over_broker_store_and_docker(
        image: tuple[str, str], store_settings: ServiceSettings, service_settings: ServiceSettings,
        tmp_path: Path) -> None:
    demo = run_training_demo(tmp_path, service_settings, store_settings, image,
                             rounds=ROUNDS, clip_bound=CLIP, noise_multiplier=Z)
    hub_store, cohorts, final = demo.hub_store, demo.cohorts, demo.final
    engine, study_id, configs = demo.engine, demo.study_id, demo.spoke_configs
    assert demo.report["state"] == "finished", (demo.report, demo.hub.logs()[-3000:])
    # The hub process refused no training message, and no spoke refused one; each spoke
    # verified the approved image and ran it, by digest, in its own sandbox.
    assert "training message refused" not in demo.hub.logs()
    for spoke, config in configs.items():
        events = [json.loads(line) for line in
                  (config.parent / "audit.jsonl").read_text().splitlines()]
        actions = [e["action"] for e in events]
        assert "training.refused" not in actions, (spoke, events)
        verified = [e for e in events if e["action"] == "image.verified"]
        assert verified and all(e["detail"]["result"] == "verified" for e in verified)
        assert all(e["target"] == "@".join(image) for e in verified)
        started = [e for e in events if e["action"] == "container.started"]
        assert len(started) == ROUNDS
        assert all(e["detail"]["limits"]["network"] == "none" for e in started)
    result = logreg.compare([cohorts / f"site{n}" for n in range(3)],
                            [cohorts / f"test{n}" for n in range(3)], final, ROUNDS)
    fed, cen = result["federated"], result["centralised"]
    print("e2e training:", json.dumps(result))
    assert fed["accuracy"] >= 0.8, result
    assert abs(fed["accuracy"] - cen["accuracy"]) <= ACCURACY_TOLERANCE, result
    assert demo.report["metric_federated"] == fed["accuracy"]
    assert demo.report["metric_centralised"] == cen["accuracy"]
    assert demo.report["secure_aggregation"] is True
    assert [len(r["participants"]) for r in demo.report["rounds"]] == [3] * ROUNDS

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
    global_in = demo.global_model_at(last.round_index)
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
        demo.store_for("site-a").put(round_update_key("site-b", 0, "forged.masked"), b"x")
