"""A coordinator cancels a running study through the hub's API: the queued cases are
cancelled at once, the spoke stops the running container and confirms, and everything is
audited. Only coordinators (and admins) may cancel or retry."""

from __future__ import annotations

import secrets
from typing import Any

import docker
import pytest
from e2e_helpers import wait_for

from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


def running_containers(spoke_id: str) -> list[Any]:
    client = docker.from_env()
    try:
        return client.containers.list(filters={"label": f"org.tributary.spoke={spoke_id}"},
                                      ignore_removed=True)
    finally:
        client.close()


def test_cancel_through_the_api_stops_the_study_everywhere(
        federation: LocalFederation, misbehaving_image: tuple[str, str], unique: str) -> None:
    spoke_id = f"cancel-{unique}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 3, seed=3, site="Cancel site")
    config = federation.add_spoke(spoke_id, data, concurrency=1)
    config.write_text(config.read_text() + "\n[liveness]\nheartbeat_seconds = 1\n")
    algorithm = federation.register_algorithm(
        name=f"cancel-{unique}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1], argument_schema={"type": "object"})
    federation.start_spoke(spoke_id, config)
    with federation.api() as api:
        experiment = api.post("/api/experiments", json={
            "name": "to be cancelled", "algorithm_id": algorithm["id"],
            "arguments": {"behaviour": "slow", "seconds": 120}, "spoke_ids": [spoke_id],
            "limits": {"timeout_seconds": 300, "memory_mb": 256},
            "expires_in_days": 2}).raise_for_status().json()
        experiment_id = experiment["id"]
        api.post(f"/api/experiments/{experiment_id}/launch").raise_for_status()
        launched = api.get(f"/api/experiments/{experiment_id}").json()
        assert launched["expires_at"] is not None  # the study's own expiry travels along

        def running_with_progress() -> list[dict[str, Any]]:
            cases = api.get(f"/api/experiments/{experiment_id}/cases").json()
            return [c for c in cases if c["state"] == "running" and c["progress_fraction"]]

        running = wait_for(running_with_progress, 120, "a running case with progress")[0]
        spoke = wait_for(lambda: (s := api.get(f"/api/spokes/{spoke_id}").json())["running"]
                         and s, 30, "a heartbeat showing the running case")
        assert spoke["online"] and spoke["concurrency"] == 1 and spoke["queue_depth"] == 2
        assert spoke["running"][0]["case_id"] == running["case_id"]

        password = secrets.token_urlsafe(12)
        api.post("/api/users", json={"username": f"dev-{unique}", "password": password,
                                     "roles": ["developer"]}).raise_for_status()
        developer = federation.sign_in(f"dev-{unique}", password)
        with federation.api(developer) as dev:
            assert dev.post(f"/api/experiments/{experiment_id}/cancel").status_code == 403
            assert dev.post(f"/api/experiments/{experiment_id}/retry").status_code == 403

        cancelled = api.post(f"/api/experiments/{experiment_id}/cancel",
                             json={"reason": "wrong cohort"}).raise_for_status().json()
        assert cancelled["state"] == "cancelled"
        target = cancelled["targets"][0]
        assert target["state"] == "cancelling" and target["cancelled"] == 2
        assert "confirm the cancellation" in target["waiting_for"]

        final = wait_for(lambda: (e := api.get(f"/api/experiments/{experiment_id}").json())
                         ["targets"][0]["state"] == "cancelled" and e, 60, "confirmation")
        assert final["state"] == "cancelled" and final["cancel_reason"] == "wrong cohort"
        cases = {c["case_id"]: c for c in api.get(f"/api/experiments/{experiment_id}/cases")
                 .json()}
        assert {c["state"] for c in cases.values()} == {"cancelled"}
        assert cases[running["case_id"]]["failure"]["reason"] == "cancelled"
        assert not running_containers(spoke_id), "the running container must be stopped"
        assert api.post(f"/api/experiments/{experiment_id}/retry").status_code == 409
        assert api.post(f"/api/experiments/{experiment_id}/launch").status_code == 409
        audit = api.get("/api/audit", params={"target": experiment_id}).json()
        actions = {e["action"] for e in audit}
        assert {"experiment.cancelled", "message.sent"} <= actions
        assert next(e for e in audit if e["action"] == "experiment.cancelled")["actor"] == "admin"
