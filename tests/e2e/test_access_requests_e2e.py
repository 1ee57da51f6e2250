"""Data access requests end to end, with real hub and spoke processes on the real broker
and Docker engine, on a hub that requires them: a launch with no request, or under a
refused one, sends nothing; under an approved one, a launch asking for an attribute
outside the conditions is refused, and one inside them reaches the spoke, whose data
steward sees the request's id, title and conditions in the signed message before deciding;
the study's bundle carries the request, the committee's decision and its audit events."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import Iterator

import httpx
import pytest
from e2e_helpers import pending, steward, wait_target

from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory,
               service_settings: ServiceSettings) -> Iterator[LocalFederation]:
    fed = LocalFederation(tmp_path_factory.mktemp("access"), service_settings,
                          hub_env={"TRIBUTARY_HUB_REQUIRE_ACCESS_REQUESTS": "true"})
    fed.start_hub()
    yield fed
    fed.stop()


def user(federation: LocalFederation, role: str) -> tuple[str, str]:
    name, password = f"{role[:5]}-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    with federation.api() as api:
        api.post("/api/users", json={"username": name, "password": password,
                                     "roles": [role]}).raise_for_status()
    return name, federation.sign_in(name, password)


def file_request(api: httpx.Client, spoke_id: str, title: str) -> dict:
    response = api.post("/api/access-requests", data={
        "title": title, "purpose": "Validate the detector on a held-out site.",
        "spokes": [spoke_id], "attributes": "nodules", "study_kinds": ["validation"],
        "k": "5"}, files={"ethics": ("ethics.pdf", PDF, "application/pdf"),
                          "dpia": ("dpia.pdf", PDF, "application/pdf")})
    assert response.status_code == 201, response.text
    return response.json()


def test_request_decision_and_a_bound_launch(federation: LocalFederation,
                                             misbehaving_image: tuple[str, str]) -> None:
    spoke_id = f"dac-{uuid.uuid4().hex[:6]}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 2, seed=41, site="Committee Hospital")
    config = federation.add_spoke(spoke_id, data, releasable=("nodules",),
                                  steward={"approve_experiments": True})
    federation.start_spoke(spoke_id, config)
    algorithm = federation.register_algorithm(
        name=f"dac-{spoke_id}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1])
    coordinator, coordinator_token = user(federation, "coordinator")
    _, member_token = user(federation, "committee")

    def experiment(api: httpx.Client, request_id: str | None, release: list[str]) -> str:
        created = api.post("/api/experiments", json={
            "name": "under a request", "algorithm_id": algorithm["id"],
            "spoke_ids": [spoke_id], "arguments": {"behaviour": "ok"}, "release": release,
            "limits": {"timeout_seconds": 120, "memory_mb": 256},
            "access_request_id": request_id})
        assert created.status_code == 201, created.text
        return str(created.json()["id"])

    with federation.api(coordinator_token) as coord, federation.api(member_token) as member:
        unbound = experiment(coord, None, ["nodules"])
        refused_launch = coord.post(f"/api/experiments/{unbound}/launch")
        assert refused_launch.status_code == 409
        assert refused_launch.json()["detail"]["condition"] == "access_request"

        refused = file_request(coord, spoke_id, "first attempt")
        member.post(f"/api/access-requests/{refused['id']}/decision", json={
            "decision": "refuse", "reason": "the DPIA names no retention period"}
        ).raise_for_status()
        under_refused = experiment(coord, refused["id"], ["nodules"])
        response = coord.post(f"/api/experiments/{under_refused}/launch")
        assert response.status_code == 409
        assert "retention period" in response.json()["detail"]["message"]

        request = file_request(coord, spoke_id, "Nodule detector validation")
        decided = member.post(f"/api/access-requests/{request['id']}/decision", json={
            "decision": "approve", "attributes": ["nodules"], "min_k": 5,
            "reason": "ethics approval and DPIA in order"})
        assert decided.status_code == 200 and decided.json()["state"] == "approved"

        outside = experiment(coord, request["id"], ["nodules", "birth_year"])
        response = coord.post(f"/api/experiments/{outside}/launch")
        assert response.status_code == 409
        assert response.json()["detail"]["condition"] == "attributes"
        assert "birth_year" in response.json()["detail"]["message"]

        inside = experiment(coord, request["id"], ["nodules"])
        launched = coord.post(f"/api/experiments/{inside}/launch")
        assert launched.status_code == 200, launched.text

    # The steward sees the request in the hub-signed message that crossed the broker.
    wait_target(federation, inside, "held", "awaiting approval by the site's data steward")
    waiting = pending(config)["experiments"]
    assert [w["experiment_id"] for w in waiting] == [inside]
    grant = waiting[0]["access_request"]
    assert grant["request_id"] == request["id"]
    assert grant["title"] == "Nodule detector validation"
    assert grant["conditions"]["attributes"] == ["nodules"]
    assert grant["conditions"]["spokes"] == [spoke_id]
    human = steward(config, "pending")
    assert request["id"] in human.stdout, human.stdout
    assert steward(config, "approve", inside, "--as", "dr-steward").returncode == 0
    final = federation.wait_for_experiment(inside, timeout=180)
    assert final["targets"][0]["state"] == "completed"
    # Nothing of the refused launches reached the spoke.
    with federation.api() as api:
        for never in (unbound, under_refused, outside):
            assert api.get(f"/api/experiments/{never}").json()["state"] == "draft"

    with federation.api(coordinator_token) as coord:
        bundle = coord.get(f"/api/experiments/{inside}/bundle")
        assert bundle.status_code == 200
        shown = coord.get(f"/api/access-requests/{request['id']}").json()
    assert shown["experiments"] == sorted([outside, inside])
    with zipfile.ZipFile(io.BytesIO(bundle.content)) as archive:
        name = next(n for n in archive.namelist() if n.endswith("experiment.json"))
        record = json.loads(archive.read(name))["access_request"]
    assert record["id"] == request["id"] and record["state"] == "approved"
    assert record["requested_by"] == coordinator
    assert [v["decision"] for v in record["votes"]] == ["approve"]
    actions = [e["action"] for e in record["audit_events"]]
    assert actions[:3] == ["access.requested", "access.vote.approve", "access.approved"]
    assert {a["kind"] for a in record["attachments"]} == {"ethics", "dpia"}


def test_the_access_commands(federation: LocalFederation) -> None:
    """``tributary access``: a coordinator files with the two files, the requester cannot
    approve, a committee member approves with conditions, the requester withdraws."""
    import os
    import subprocess
    import sys

    spoke_id = f"cli-{uuid.uuid4().hex[:6]}"
    with federation.api() as api:
        api.post("/api/spokes", json={"id": spoke_id, "name": spoke_id}).raise_for_status()
    _, coordinator = user(federation, "coordinator")
    _, member = user(federation, "committee")
    (federation.root / "ethics.pdf").write_bytes(PDF)
    (federation.root / "dpia.png").write_bytes(b"not a png at all")

    def access(token: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TRIBUTARY_HUB_URL": federation.hub_url,
               "TRIBUTARY_TOKEN": token, "COLUMNS": "300", "NO_COLOR": "1"}
        return subprocess.run([sys.executable, "-m", "tributary.cli", "access", *args],
                              capture_output=True, text=True, timeout=60, env=env)

    request = ("request", "--title", "CLI study", "--purpose", "testing the commands",
               "--spoke", spoke_id, "--kind", "validation", "--attribute", "nodules",
               "--attribute", "age", "--ethics", str(federation.root / "ethics.pdf"))
    bad = access(coordinator, *request, "--dpia", str(federation.root / "dpia.png"))
    assert bad.returncode == 1 and "not a PDF, PNG or JPEG" in bad.stderr, bad.stderr
    filed = access(coordinator, *request, "--dpia", str(federation.root / "ethics.pdf"))
    assert filed.returncode == 0, filed.stderr
    request_id = next(w for w in filed.stdout.split() if w.startswith("ar-")).rstrip(":")
    own = access(coordinator, "approve", request_id)
    assert own.returncode == 1 and "403" in own.stderr
    approved = access(member, "approve", request_id, "--attribute", "nodules",
                      "--min-k", "10", "--reason", "fine")
    assert approved.returncode == 0, approved.stderr
    shown = json.loads(access(member, "show", request_id, "--json").stdout)
    assert shown["state"] == "approved"
    assert shown["conditions"]["attributes"] == ["nodules"]
    assert shown["conditions"]["min_k"] == 10
    assert access(coordinator, "withdraw", request_id).returncode == 0
    assert request_id in access(member, "list").stdout
    assert json.loads(access(coordinator, "show", request_id, "--json").stdout
                      )["state"] == "withdrawn"
