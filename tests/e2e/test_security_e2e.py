"""What someone with broker access but without the right key can do: nothing. Forged,
unsigned, replayed and expired experiment messages run nothing at a real spoke; forged
results and results signed with a revoked key are refused by the real hub and kept aside."""

from __future__ import annotations

import base64
import json
import queue
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from e2e_helpers import running_site

from tributary.protocol.broker import BrokerSettings, Delivery, StompClient
from tributary.protocol.destinations import dead_letter_queue, results_queue, spoke_queue
from tributary.protocol.messages import (
    AlgorithmRef,
    CaseStatus,
    ExperimentMessage,
    ResultMessage,
    encode,
)
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal
from tributary.services.settings import ServiceSettings
from tributary.testbed.containerwatch import ContainerWatch
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def site(federation: LocalFederation, misbehaving_image: tuple[str, str],
         service_settings: ServiceSettings) -> dict[str, Any]:
    spoke_id, _config, algorithm = running_site(federation, misbehaving_image, "guarded", 3,
                                                "Guarded Hospital")
    client = StompClient(BrokerSettings(host=service_settings.host,
                                        port=service_settings.broker_port), "attacker")
    client.start(wait=30)
    yield {"id": spoke_id, "algorithm": algorithm, "image": misbehaving_image, "client": client,
           "queue": spoke_queue(spoke_id, federation.federation),
           "results": results_queue(federation.federation)}
    client.close()


def new_experiment(federation: LocalFederation, site: dict[str, Any]) -> str:
    with federation.api() as api:
        created = api.post("/api/experiments", json={
            "name": "security", "algorithm_id": site["algorithm"]["id"],
            "arguments": {"behaviour": "ok"}, "spoke_ids": [site["id"]]})
        assert created.status_code == 201, created.text
        return created.json()["id"]


def message(site: dict[str, Any], experiment_id: str, **extra: Any) -> ExperimentMessage:
    repository, digest = site["image"]
    return ExperimentMessage(
        experiment_id=experiment_id, spoke_id=site["id"], arguments={"behaviour": "ok"},
        algorithm=AlgorithmRef(name="ok", version="1", repository=repository, digest=digest,
                               approval=site["algorithm"]["approval"]),
        **extra)


def watch(site: dict[str, Any]) -> ContainerWatch:
    """Containers created for the site from now on, watched live (see ContainerWatch)."""
    return LocalFederation.watch_containers(f"org.tributary.spoke={site['id']}")


def target(federation: LocalFederation, experiment_id: str) -> dict[str, Any]:
    with federation.api() as api:
        return api.get(f"/api/experiments/{experiment_id}").json()["targets"][0]


def wait_target(federation: LocalFederation, experiment_id: str, states: set[str],
                timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = target(federation, experiment_id)
        if current["state"] in states:
            return current
        time.sleep(0.3)
    raise AssertionError(f"target still {current}")


def test_forged_and_unsigned_experiment_messages_run_nothing(
        federation: LocalFederation, site: dict[str, Any]) -> None:
    created = watch(site)
    exp_id = new_experiment(federation, site)
    forged = message(site, exp_id)
    client: StompClient = site["client"]
    client.publish(site["queue"], encode(forged))  # unsigned
    client.publish(site["queue"], seal(forged, SigningKey.generate()))  # wrong key
    dead: queue.Queue[Delivery] = queue.Queue()
    client.subscribe(dead_letter_queue(site["queue"]), dead.put)
    bodies = []
    for _ in range(2):
        delivery = dead.get(timeout=60)
        client.ack(delivery)
        bodies.append(delivery.body)
    assert any(b.startswith(b'{"protocol_version"') for b in bodies)
    assert any(b'"signatures"' in b for b in bodies)
    assert created.stop() == []
    assert target(federation, exp_id)["state"] == "pending"


def test_replayed_and_expired_experiment_messages_run_nothing(
        federation: LocalFederation, site: dict[str, Any]) -> None:
    hub_key = SigningKey.load(federation.hub_key_path)
    client: StompClient = site["client"]
    exp_id = new_experiment(federation, site)
    envelope = seal(message(site, exp_id), hub_key)
    client.publish(site["queue"], envelope)
    done = wait_target(federation, exp_id, {"completed"})
    assert done["succeeded"] == 2

    created = watch(site)
    client.publish(site["queue"], envelope)  # the same signed message, replayed
    expired_id = new_experiment(federation, site)
    stale = message(site, expired_id, expires_at=datetime.now(UTC) - timedelta(minutes=1))
    client.publish(site["queue"], seal(stale, hub_key))
    refused = wait_target(federation, expired_id, {"refused"})
    assert "expired" in refused["reason"]
    assert created.stop() == [], "a replayed or expired message ran"
    assert target(federation, exp_id)["succeeded"] == 2


def _quarantined(federation: LocalFederation, marker: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with federation.api() as api:
            for item in api.get("/api/quarantine").json():
                try:  # other tests quarantine bodies that are not envelopes at all
                    payload = base64.b64decode(json.loads(item["body"]).get("payload", ""))
                except (ValueError, TypeError, AttributeError, RecursionError):
                    continue
                if marker.encode() in payload:
                    return item
        time.sleep(0.3)
    raise AssertionError(f"nothing quarantined with {marker}")


def test_forged_result_is_refused_and_kept_aside(federation: LocalFederation,
                                                 site: dict[str, Any]) -> None:
    exp_id = new_experiment(federation, site)
    marker = uuid.uuid4().hex
    fake = ResultMessage(experiment_id=exp_id, spoke_id=site["id"], case_id=f"c-{marker[:16]}",
                         status=CaseStatus.SUCCEEDED, output={"marker": marker})
    site["client"].publish(site["results"], seal(fake, SigningKey.generate()))
    item = _quarantined(federation, marker)
    assert "not an active enrolled key" in item["reason"]
    with federation.api() as api:
        audit = api.get("/api/audit", params={"action": "message.rejected"}).json()
    assert any("not an active enrolled key" in a["detail"]["reason"] for a in audit)


def test_revoked_key_is_refused(federation: LocalFederation, site: dict[str, Any]) -> None:
    spoke_id = f"revoked-{uuid.uuid4().hex[:6]}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 1, seed=4, site="Revoked Clinic")
    config = federation.add_spoke(spoke_id, data)
    key = SigningKey.load(config.parent / "spoke.key")
    with federation.api() as api:
        exp_id = api.post("/api/experiments", json={
            "name": "before revocation", "algorithm_id": site["algorithm"]["id"],
            "spoke_ids": [spoke_id]}).raise_for_status().json()["id"]
        revoked = api.post(f"/api/spokes/{spoke_id}/keys/{key.keyid}/revoke")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        refused = api.post("/api/experiments", json={
            "name": "after revocation", "algorithm_id": site["algorithm"]["id"],
            "spoke_ids": [spoke_id]})
        assert refused.status_code == 422 and "enrolled key" in refused.json()["detail"]
        again = api.post(f"/api/spokes/{spoke_id}/keys",
                         json={"public_key_pem": key.public.pem})
        assert again.status_code == 422
    marker = uuid.uuid4().hex
    late = ResultMessage(experiment_id=exp_id, spoke_id=spoke_id, case_id=f"c-{marker[:16]}",
                         status=CaseStatus.SUCCEEDED, output={"marker": marker})
    site["client"].publish(site["results"], seal(late, key))
    assert "not an active enrolled key" in _quarantined(federation, marker)["reason"]


def test_hub_signed_message_without_approval_runs_nothing(
        federation: LocalFederation, site: dict[str, Any]) -> None:
    """Even a message the hub key signed is refused when it carries no approval statement
    for the digest (a hub bug or a hub-database compromise)."""
    hub_key = SigningKey.load(federation.hub_key_path)
    exp_id = new_experiment(federation, site)
    unapproved = message(site, exp_id).model_copy(update={"algorithm": AlgorithmRef(
        name="ok", version="1", repository=site["image"][0], digest=site["image"][1])})
    created = watch(site)
    site["client"].publish(site["queue"], seal(unapproved, hub_key))
    refused = wait_target(federation, exp_id, {"refused"})
    assert "not approved" in refused["reason"]
    assert created.stop() == []
