"""The simulated spokes of the load harness (``tributary.testbed.simspoke``) speak the real
protocol: enrolled at a real hub, they receive the study it launches through the broker,
and their signed results with custody chains complete it. Not a speed test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.messages import ExperimentState as SpokeState
from tributary.protocol.signing import PublicKey
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation
from tributary.testbed.simspoke import SimSpoke, publish_results

pytestmark = pytest.mark.e2e

DIGEST = "sha256:" + "5" * 64


def test_simulated_spokes_complete_a_study(tmp_path: Path, service_settings: ServiceSettings,
                                           unique: str) -> None:
    federation = LocalFederation(tmp_path / "fed", service_settings,
                                 hub_env={"TRIBUTARY_HUB_VERIFY_REGISTRY": "false"})
    spokes = [SimSpoke(f"sim-{unique}-{i}") for i in range(2)]
    try:
        federation.start_hub()
        with federation.api() as api:
            for spoke in spokes:
                api.post("/api/spokes", json={"id": spoke.spoke_id, "name": spoke.spoke_id}
                         ).raise_for_status()
                api.post(f"/api/spokes/{spoke.spoke_id}/keys",
                         json={"public_key_pem": spoke.key.public.pem}).raise_for_status()
        algorithm = federation.register_algorithm(name=f"sim-{unique}", version="1",
                                                  repository="sim/alg", digest=DIGEST)
        with federation.api() as api:
            experiment = api.post("/api/experiments", json={
                "name": "simulated", "algorithm_id": algorithm["id"],
                "spoke_ids": [s.spoke_id for s in spokes]}).raise_for_status().json()
            api.post(f"/api/experiments/{experiment['id']}/launch").raise_for_status()

        client = StompClient(BrokerSettings(host=service_settings.host,
                                            port=service_settings.broker_port,
                                            federation=federation.federation), "sim").start(30)
        try:
            hub_keys = [PublicKey.load(Path(f"{federation.hub_key_path}.pub"))]
            bodies = []
            for spoke in spokes:
                message = spoke.receive_experiment(client, hub_keys)
                assert message.experiment_id == experiment["id"]
                assert message.algorithm.digest == DIGEST
                cases = [f"{spoke.spoke_id}-c{i}" for i in range(3)]
                bodies += [spoke.status(message.experiment_id, SpokeState.ACCEPTED, cases),
                           spoke.heartbeat(queue_depth=3)]
                bodies += [spoke.result(message.experiment_id, case, DIGEST, {"volume": 1.5})
                           for case in cases]
                bodies.append(spoke.status(message.experiment_id, SpokeState.COMPLETED))
            publish_results(client, bodies)
        finally:
            client.close()

        done = federation.wait_for_experiment(experiment["id"], timeout=60)
        assert done["state"] == "completed"
        with federation.api() as api:
            cases = api.get(f"/api/experiments/{experiment['id']}/cases").raise_for_status()
            assert sorted(c["state"] for c in cases.json()) == ["succeeded"] * 6
            listed = {s["id"]: s for s in api.get("/api/spokes").raise_for_status().json()}
            assert all(listed[s.spoke_id]["last_heartbeat_at"] for s in spokes)
    finally:
        federation.stop()
