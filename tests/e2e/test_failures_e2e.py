"""Algorithms that crash, hang, write garbage or try the network, and images the registry
does not serve: each ends as a clear failure, nothing is lost, and the spoke keeps working."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import httpx
import pytest

from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e

SCHEMA = {"type": "object", "properties": {"behaviour": {"type": "string"}}}


@pytest.fixture(scope="module")
def spoke(federation: LocalFederation, misbehaving_image: tuple[str, str]) -> dict[str, Any]:
    import uuid

    spoke_id = f"faulty-{uuid.uuid4().hex[:6]}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 2, seed=7, site="Faulty Site")
    config = federation.add_spoke(spoke_id, data)
    algorithm = federation.register_algorithm(
        name=f"misbehaving-{spoke_id}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1], argument_schema=SCHEMA)
    federation.start_spoke(spoke_id, config)
    return {"id": spoke_id, "algorithm_id": algorithm["id"]}


def run(federation: LocalFederation, spoke: dict[str, Any], arguments: dict[str, Any],
        algorithm_id: int | None = None, timeout_seconds: int = 120,
        **limits: Any) -> tuple[dict, list[dict]]:
    with federation.api() as api:
        created = api.post("/api/experiments", json={
            "name": f"misbehave {arguments}", "algorithm_id": algorithm_id or spoke["algorithm_id"],
            "arguments": arguments, "spoke_ids": [spoke["id"]],
            "limits": {"timeout_seconds": timeout_seconds, "memory_mb": 256, **limits}})
        assert created.status_code == 201, created.text
        exp_id = created.json()["id"]
        api.post(f"/api/experiments/{exp_id}/launch").raise_for_status()
        experiment = federation.wait_for_experiment(exp_id, timeout=300)
        return experiment, api.get(f"/api/experiments/{exp_id}/cases").json()


@pytest.mark.parametrize(("arguments", "timeout", "reason", "evidence"), [
    ({"behaviour": "crash"}, 120, "exit_code", "Traceback"),
    ({"behaviour": "hang"}, 3, "timeout", None),
    ({"behaviour": "garbage"}, 120, "invalid_output", None),
    ({"behaviour": "not-object"}, 120, "invalid_output", None),
    ({"behaviour": "oversize"}, 120, "output_too_large", None),
    ({"behaviour": "no-output"}, 120, "missing_output", None),
    ({"behaviour": "network"}, 120, "exit_code", "network access failed"),
    ({"behaviour": "write-input"}, 120, "exit_code", "Read-only file system"),
])
def test_misbehaving_algorithm_fails_clearly(federation: LocalFederation, spoke: dict[str, Any],
                                             arguments: dict, timeout: int, reason: str,
                                             evidence: str | None) -> None:
    experiment, cases = run(federation, spoke, arguments, timeout_seconds=timeout)
    assert experiment["targets"][0]["state"] == "completed"
    assert len(cases) == 2
    for case in cases:
        assert case["state"] == "failed"
        assert case["failure"]["reason"] == reason, case["failure"]
        assert case["failure"]["detail"]
        if evidence:
            assert evidence in (case["failure"]["log_tail"] or ""), case["failure"]


def test_spoke_keeps_working_after_failures(federation: LocalFederation,
                                            spoke: dict[str, Any]) -> None:
    run(federation, spoke, {"behaviour": "crash"})
    experiment, cases = run(federation, spoke, {"behaviour": "ok"})
    assert [c["state"] for c in cases] == ["succeeded", "succeeded"]
    assert all(c["output"]["ok"] is True for c in cases)
    assert experiment["targets"][0]["succeeded"] == 2


def test_registry_refuses_unknown_digest_at_registration(
        federation: LocalFederation, misbehaving_image: tuple[str, str]) -> None:
    with federation.api() as api:
        response = api.post("/api/algorithms", json={
            "name": "ghost", "version": "1", "repository": misbehaving_image[0],
            "digest": "sha256:" + "0" * 64})
        assert response.status_code == 422
        assert "not served by the registry" in response.json()["detail"]
        tagged = api.post("/api/algorithms", json={
            "name": "ghost", "version": "2", "repository": misbehaving_image[0] + ":latest",
            "digest": misbehaving_image[1]})
        assert tagged.status_code == 422


def test_spoke_refuses_digest_the_registry_does_not_serve(
        federation: LocalFederation, spoke: dict[str, Any],
        service_settings: ServiceSettings) -> None:
    """The registry stops serving an approved digest: the spoke refuses before running."""
    from tributary.testbed.federation import build_and_push

    # A fresh image (unique content, so unique digest) that no engine has cached.
    stamp = str(time.time_ns())
    build_dir = federation.root / f"gone-{stamp}"
    build_dir.mkdir()
    (build_dir / "Dockerfile").write_text(
        f"ARG BASE_IMAGE=python:3.11-slim\nFROM ${{BASE_IMAGE}}\nLABEL stamp={stamp}\n"
        'ENTRYPOINT ["python3", "-c", "print(1)"]\n')
    repository, digest = build_and_push(build_dir, "vanishing", stamp, service_settings)
    algorithm = federation.register_algorithm(name=f"vanishing-{stamp}", version="1",
                                              repository=repository, digest=digest)
    name = repository.split("/", 1)[1]
    httpx.delete(f"http://{service_settings.registry}/v2/{name}/manifests/{digest}"
                 ).raise_for_status()
    subprocess.run(["docker", "rmi", "-f", f"{repository}@{digest}",
                    f"tributary/vanishing:{stamp}", f"{repository}:{stamp}"], capture_output=True)

    watch = federation.watch_containers(f"org.tributary.spoke={spoke['id']}")
    experiment, cases = run(federation, spoke, {}, algorithm_id=algorithm["id"])
    target = experiment["targets"][0]
    assert target["state"] == "refused"
    assert "image_unavailable" in target["reason"]
    assert cases == []
    assert watch.stop() == [], "a container was created for a refused experiment"


def test_a_site_without_gpus_refuses_a_gpu_study_saying_why(
        federation: LocalFederation, spoke: dict[str, Any]) -> None:
    """The site offers no GPUs (the default) and says so in its heartbeats (protocol 1.5):
    the hub refuses the launch with the site's reason before sending anything, and no
    container is created. (The spoke applies the same rule on arrival, for hubs that do
    not know its capacity: tests/unit/test_spoke_trust.py.)"""
    watch = federation.watch_containers(f"org.tributary.spoke={spoke['id']}")
    deadline = time.monotonic() + 60
    while not _capacity_reported(federation, spoke["id"]):  # its first heartbeat
        assert time.monotonic() < deadline, "the spoke never reported its capacity"
        time.sleep(0.5)
    with federation.api() as api:
        created = api.post("/api/experiments", json={
            "name": "wants a gpu", "algorithm_id": spoke["algorithm_id"],
            "arguments": {"behaviour": "ok"}, "spoke_ids": [spoke["id"]],
            "limits": {"timeout_seconds": 120, "memory_mb": 256, "gpus": 1}})
        assert created.status_code == 201, created.text
        launched = api.post(f"/api/experiments/{created.json()['id']}/launch")
        assert launched.status_code == 409, launched.text
        [refusal] = launched.json()["detail"]["refusals"]
        assert refusal["spoke_id"] == spoke["id"]
        assert "asks for 1 GPU(s) per case; this site offers none" in refusal["reason"]
        experiment = api.get(f"/api/experiments/{created.json()['id']}").json()
        assert experiment["launched_at"] is None  # nothing was sent
    assert watch.stop() == [], "a container was created for a refused experiment"


def _capacity_reported(federation: LocalFederation, spoke_id: str) -> bool:
    with federation.api() as api:
        spokes = api.get("/api/spokes").json()
    return any(s["id"] == spoke_id and s.get("capacity") for s in spokes)
