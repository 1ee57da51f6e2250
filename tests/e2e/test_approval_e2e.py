"""Approval under the federation's review rule: nothing is launched, and no spoke runs
anything, without the hub's signed approval of the exact digest; a revoked approval stops
new experiments."""

from __future__ import annotations

import json
import uuid

import pytest

from tributary.protocol.release import verify_approval
from tributary.protocol.signing import PublicKey
from tributary.testbed.federation import LocalFederation

pytestmark = pytest.mark.e2e


def reviewer(federation: LocalFederation, org: str) -> str:
    name, password = f"rev-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    with federation.api() as api:
        api.post("/api/users", json={"username": name, "password": password,
                                     "roles": ["reviewer"], "organisation": org}
                 ).raise_for_status()
    return federation.sign_in(name, password)


def test_review_rule_approval_and_revocation(federation: LocalFederation,
                                             misbehaving_image: tuple[str, str]) -> None:
    spoke_id = f"appr-{uuid.uuid4().hex[:6]}"
    with federation.api() as api:
        api.post("/api/spokes", json={"id": spoke_id, "name": spoke_id}).raise_for_status()
        from tributary.protocol.signing import SigningKey

        api.post(f"/api/spokes/{spoke_id}/keys", json={
            "public_key_pem": SigningKey.generate().public.pem}).raise_for_status()
    algorithm = federation.register_algorithm(
        approve=False, name=f"appr-{spoke_id}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1])
    aid = algorithm["id"]

    def create() -> object:
        with federation.api() as api:
            return api.post("/api/experiments", json={"name": "approval", "algorithm_id": aid,
                                                       "spoke_ids": [spoke_id]})

    refused = create()
    assert refused.status_code == 422 and "not approved" in refused.json()["detail"]

    first, same_org, other_org = (reviewer(federation, "Org One"),
                                  reviewer(federation, "Org One"), reviewer(federation, "Org Two"))
    for token in (first, same_org):
        with federation.api(token) as api:
            after = api.post(f"/api/algorithms/{aid}/reviews", json={"decision": "approve"})
            assert after.status_code == 200 and after.json()["approval"] is None
    with federation.api(first) as api:
        twice = api.post(f"/api/algorithms/{aid}/reviews", json={"decision": "approve"})
        assert twice.status_code == 409
    with federation.api() as api:  # the registrant (admin) may not review its own version
        own = api.post(f"/api/algorithms/{aid}/reviews", json={"decision": "approve"})
        assert own.status_code == 409 and "registrant" in own.json()["detail"]
    with federation.api(other_org) as api:
        approved = api.post(f"/api/algorithms/{aid}/reviews", json={"decision": "approve"})
    approval = approved.json()["approval"]
    assert approval is not None
    hub_key = PublicKey.load(federation.hub_key_path.parent / "hub.key.pub")
    predicate = verify_approval(approval, [hub_key], misbehaving_image[1])
    assert {r["organisation"] for r in predicate["reviewers"]} == {"Org One", "Org Two"}
    experiment = create()
    assert experiment.status_code == 201

    with federation.api() as api:
        revoked = api.post(f"/api/algorithms/{aid}/revoke", json={"reason": "flawed"})
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        launch = api.post(f"/api/experiments/{experiment.json()['id']}/launch")
        assert launch.status_code == 409 and "revoked" in launch.json()["detail"]
        assert create().status_code == 422
        actions = [a["action"] for a in api.get("/api/audit", params={"limit": 500}).json()
                   if a["target"] == f"appr-{spoke_id} 1"]
    assert {"algorithm.approved", "algorithm.revoked", "algorithm.review.approve"} <= set(actions)


def test_revocation_overtakes_experiments_waiting_in_the_queue(
        federation: LocalFederation, misbehaving_image: tuple[str, str]) -> None:
    """Launched while the spoke is offline, revoked before it returns: nothing runs."""

    from tributary.testbed.federation import generate_cohort

    spoke_id = f"late-{uuid.uuid4().hex[:6]}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 1, seed=31, site="Late Hospital")
    config = federation.add_spoke(spoke_id, data)
    algorithm = federation.register_algorithm(
        name=f"late-{spoke_id}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1])
    with federation.api() as api:
        exp = api.post("/api/experiments", json={
            "name": "queued", "algorithm_id": algorithm["id"], "spoke_ids": [spoke_id],
            "arguments": {"behaviour": "ok"}}).raise_for_status().json()
        api.post(f"/api/experiments/{exp['id']}/launch").raise_for_status()
        revoked = api.post(f"/api/algorithms/{algorithm['id']}/revoke",
                           json={"reason": "found to leak identifiers"})
        assert revoked.status_code == 200, revoked.text
    created = federation.watch_containers(f"org.tributary.spoke={spoke_id}")
    federation.start_spoke(spoke_id, config)
    final = federation.wait_for_experiment(exp["id"], timeout=120)
    target = final["targets"][0]
    assert target["state"] == "refused"
    assert "approval revoked" in target["reason"] and "leak identifiers" in target["reason"]
    assert created.stop() == []


def test_revocation_stops_a_case_already_running(
        federation: LocalFederation, misbehaving_image: tuple[str, str]) -> None:
    """Revoked while its container runs: the container is stopped at once and the case
    ends failed, with the revocation as its reason."""
    import subprocess
    import time

    from tributary.testbed.federation import generate_cohort

    spoke_id = f"busy-{uuid.uuid4().hex[:6]}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 1, seed=32, site="Busy Hospital")
    federation.start_spoke(spoke_id, federation.add_spoke(spoke_id, data))
    algorithm = federation.register_algorithm(
        name=f"busy-{spoke_id}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1])
    with federation.api() as api:
        exp = api.post("/api/experiments", json={
            "name": "running", "algorithm_id": algorithm["id"], "spoke_ids": [spoke_id],
            "arguments": {"behaviour": "slow", "seconds": 300}}).raise_for_status().json()
        api.post(f"/api/experiments/{exp['id']}/launch").raise_for_status()
        label = f"label=org.tributary.spoke={spoke_id}"
        deadline = time.monotonic() + 90
        while not subprocess.run(["docker", "ps", "-q", "--filter", label], text=True,
                                 capture_output=True).stdout.strip():
            assert time.monotonic() < deadline, "the case never started"
            time.sleep(0.5)
        revoked_at = time.monotonic()
        api.post(f"/api/algorithms/{algorithm['id']}/revoke",
                 json={"reason": "withdrawn mid-study"}).raise_for_status()
    final = federation.wait_for_experiment(exp["id"], timeout=120)
    assert time.monotonic() - revoked_at < 60  # far less than the case's 300 s
    assert final["targets"][0]["failed"] == 1
    with federation.api() as api:
        [case] = api.get(f"/api/experiments/{exp['id']}/cases").raise_for_status().json()
    assert case["state"] == "failed"
    assert "approval revoked" in json.dumps(case) and "withdrawn mid-study" in json.dumps(case)
    assert subprocess.run(["docker", "ps", "-q", "--filter", label], text=True,
                          capture_output=True).stdout.strip() == ""
