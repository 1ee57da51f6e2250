"""Signed algorithm images against the real registry, hub and spoke: a spoke that pins a
publisher key runs only images that publisher signed, by digest. A tampered image (same
tag, new digest), an unsigned image and one signed by an unknown key run nothing, and each
refusal is audited with its reason."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from tributary.federation import LocalFederation, build_and_push, generate_cohort
from tributary.hub.db import make_engine
from tributary.hub.models import Algorithm
from tributary.protocol.release import sign_release
from tributary.protocol.signing import SigningKey
from tributary.services.settings import ServiceSettings

pytestmark = pytest.mark.e2e


def tiny_image(root: Path, stamp: str, settings: ServiceSettings, tag: str) -> tuple[str, str]:
    """A small algorithm image; ``stamp`` changes its content, so its digest."""
    build = root / f"img-{uuid.uuid4().hex[:6]}"
    build.mkdir()
    (build / "Dockerfile").write_text(
        "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}\n"
        f"LABEL stamp={stamp}\nUSER 65534:65534\n"
        'ENTRYPOINT ["python3", "-c", "import json, os; a = json.loads(os.environ[\'ALGO_ARG\']);'
        f" json.dump({{'stamp': '{stamp}'}}, open(a['output'], 'w'))\"]\n")
    return build_and_push(build, "trusted-demo", tag, settings)


@pytest.fixture(scope="module")
def trust(federation: LocalFederation, service_settings: ServiceSettings) -> dict[str, Any]:
    publisher = SigningKey.generate()
    publisher.save(federation.root / f"publisher-{uuid.uuid4().hex[:6]}.key")
    stranger = SigningKey.generate()
    spoke_id = f"strict-{uuid.uuid4().hex[:6]}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 1, seed=9, site="Strict Hospital")
    pub_path = federation.root / f"{spoke_id}-publisher.pem"
    pub_path.write_text(publisher.public.pem)
    config = federation.add_spoke(spoke_id, data, publisher_keys=(pub_path,))
    federation.start_spoke(spoke_id, config)
    with federation.api() as api:
        for name, key in (("Good Publisher", publisher), ("Stranger Labs", stranger)):
            api.post("/api/publishers", json={"name": name, "public_key_pem": key.public.pem}
                     ).raise_for_status()
    tag = uuid.uuid4().hex[:8]
    original = tiny_image(federation.root, "original", service_settings, tag)
    return {"spoke": spoke_id, "publisher": publisher, "stranger": stranger,
            "original": original, "tag": tag}


class Registered:
    """The outcome of a registration attempt, approved under the review rule if accepted."""

    def __init__(self, status_code: int, body: dict) -> None:
        self.status_code, self._body = status_code, body

    def json(self) -> dict:
        return self._body

    @property
    def text(self) -> str:
        return json.dumps(self._body)


def register(federation: LocalFederation, image: tuple[str, str],
             signature: dict | None) -> Registered:
    body = {"name": f"trusted-{uuid.uuid4().hex[:6]}", "version": "1", "repository": image[0],
            "digest": image[1], "release_signature": signature}
    with federation.api() as api:
        response = api.post("/api/algorithms", json=body)
    if response.status_code != 201:
        return Registered(response.status_code, response.json())
    algorithm = response.json()
    for token in federation.reviewer_tokens():
        with federation.api(token) as api:
            algorithm = api.post(f"/api/algorithms/{algorithm['id']}/reviews",
                                 json={"decision": "approve"}).raise_for_status().json()
    return Registered(201, algorithm)


def run_on_spoke(federation: LocalFederation, algorithm_id: int, spoke: str) -> dict:
    with federation.api() as api:
        exp = api.post("/api/experiments", json={
            "name": "trust", "algorithm_id": algorithm_id, "spoke_ids": [spoke]}
        ).raise_for_status().json()
        api.post(f"/api/experiments/{exp['id']}/launch").raise_for_status()
    return federation.wait_for_experiment(exp["id"], timeout=120)


def created_since(spoke: str, since: float) -> str:
    return LocalFederation.containers_created(since, f"org.tributary.spoke={spoke}")


def spoke_refusals(federation: LocalFederation, spoke: str) -> list[dict]:
    log = federation.root / "spokes" / spoke / "audit.jsonl"
    if not log.exists():
        return []
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [e for e in entries if e.get("detail", {}).get("result") == "refused"]


def sign(key: SigningKey, image: tuple[str, str]) -> dict:
    return sign_release(key, image[0], image[1], "trusted-demo", "1", "Good Publisher")


def test_signed_image_runs(federation: LocalFederation, trust: dict[str, Any]) -> None:
    created = register(federation, trust["original"], sign(trust["publisher"], trust["original"]))
    assert created.status_code == 201, created.text
    assert created.json()["publisher"] == "Good Publisher"
    final = run_on_spoke(federation, created.json()["id"], trust["spoke"])
    assert final["targets"][0]["succeeded"] == 1


def test_unsigned_image_runs_nothing(federation: LocalFederation, trust: dict[str, Any]) -> None:
    created = register(federation, trust["original"], None)
    assert created.status_code == 201  # this hub allows unsigned images; the spoke does not
    since = time.time()
    final = run_on_spoke(federation, created.json()["id"], trust["spoke"])
    assert final["targets"][0]["state"] == "refused"
    assert "unsigned image" in final["targets"][0]["reason"]
    assert created_since(trust["spoke"], since) == ""


def test_image_signed_by_unknown_key_runs_nothing(federation: LocalFederation,
                                                  trust: dict[str, Any]) -> None:
    unregistered = register(federation, trust["original"],
                            sign(SigningKey.generate(), trust["original"]))
    assert unregistered.status_code == 422
    assert "not a registered publisher" in unregistered.json()["detail"]
    # A publisher the hub knows but this spoke does not trust.
    created = register(federation, trust["original"], sign(trust["stranger"], trust["original"]))
    assert created.status_code == 201
    since = time.time()
    final = run_on_spoke(federation, created.json()["id"], trust["spoke"])
    assert final["targets"][0]["state"] == "refused"
    assert "release signature" in final["targets"][0]["reason"]
    assert created_since(trust["spoke"], since) == ""
    with federation.api() as api:
        refused = api.get("/api/audit", params={"action": "algorithm.refused"}).json()
    assert any("not a registered publisher" in a["detail"]["reason"] for a in refused)


def test_tampered_image_same_tag_new_digest_runs_nothing(
        federation: LocalFederation, trust: dict[str, Any],
        service_settings: ServiceSettings) -> None:
    tampered = tiny_image(federation.root, "tampered", service_settings, trust["tag"])
    assert tampered[0] == trust["original"][0] and tampered[1] != trust["original"][1]
    old_signature = sign(trust["publisher"], trust["original"])
    refused = register(federation, tampered, old_signature)
    assert refused.status_code == 422 and "not for" in refused.json()["detail"]
    # Even if the hub were fooled (verification off), the spoke refuses before pulling.
    algorithm = register(federation, trust["original"], old_signature).json()

    engine = make_engine(f"sqlite:///{federation.root / 'hub.db'}")
    with Session(engine) as session:  # what a hub-database compromise would do
        row = session.get(Algorithm, algorithm["id"])
        row.digest = tampered[1]
        session.add(row)
        session.commit()
    since = time.time()
    final = run_on_spoke(federation, algorithm["id"], trust["spoke"])
    assert final["targets"][0]["state"] == "refused"
    assert "not for" in final["targets"][0]["reason"]
    assert created_since(trust["spoke"], since) == ""
    reasons = [e["detail"].get("error", "") for e in spoke_refusals(federation, trust["spoke"])]
    assert any("unsigned image" in r for r in reasons)
    assert any("not for" in r for r in reasons)
