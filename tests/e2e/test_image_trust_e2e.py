"""Signed algorithm images against the real registry, hub and spoke: a spoke that pins a
publisher key runs only images that publisher signed, by digest. A tampered image (same
tag, new digest), an unsigned image and one signed by an unknown key run nothing, and each
refusal is audited with its reason."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlmodel import Session

from tributary.hub.db import make_engine
from tributary.hub.models import Algorithm
from tributary.protocol.registry import RegistryClient
from tributary.protocol.release import PREDICATE_TYPE as RELEASE_TYPE
from tributary.protocol.release import sign_release
from tributary.protocol.signing import SigningKey
from tributary.services.settings import ServiceSettings
from tributary.testbed.containerwatch import ContainerWatch
from tributary.testbed.federation import LocalFederation, build_and_push, generate_cohort

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
    publisher_key = federation.root / f"publisher-{uuid.uuid4().hex[:6]}.key"
    publisher.save(publisher_key)
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
            "original": original, "tag": tag, "publisher_key": publisher_key}


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
    name = f"trusted-{uuid.uuid4().hex[:6]}"
    if signature is not None:  # the hub refuses a statement for another name or version
        name = json.loads(base64.b64decode(signature["payload"]))["predicate"]["name"]
    body = {"name": name, "version": "1", "repository": image[0],
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


def watch(spoke: str) -> ContainerWatch:
    """Containers created for ``spoke`` from now on, watched live (see ContainerWatch)."""
    return LocalFederation.watch_containers(f"org.tributary.spoke={spoke}")


def spoke_refusals(federation: LocalFederation, spoke: str) -> list[dict]:
    log = federation.root / "spokes" / spoke / "audit.jsonl"
    if not log.exists():
        return []
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [e for e in entries if e.get("detail", {}).get("result") == "refused"]


def sign(key: SigningKey, image: tuple[str, str]) -> dict:
    """A release of a version of its own (name ``trusted-…``, version 1)."""
    return sign_release(key, image[0], image[1], f"trusted-{uuid.uuid4().hex[:6]}", "1",
                        "Good Publisher")


def test_signed_image_runs(federation: LocalFederation, trust: dict[str, Any]) -> None:
    created = register(federation, trust["original"], sign(trust["publisher"], trust["original"]))
    assert created.status_code == 201, created.text
    assert created.json()["publisher"] == "Good Publisher"
    final = run_on_spoke(federation, created.json()["id"], trust["spoke"])
    assert final["targets"][0]["succeeded"] == 1


def test_unsigned_image_runs_nothing(federation: LocalFederation, trust: dict[str, Any]) -> None:
    created = register(federation, trust["original"], None)
    assert created.status_code == 201  # this hub allows unsigned images; the spoke does not
    created_since = watch(trust["spoke"])
    final = run_on_spoke(federation, created.json()["id"], trust["spoke"])
    assert final["targets"][0]["state"] == "refused"
    assert "unsigned image" in final["targets"][0]["reason"]
    assert created_since.stop() == []


def test_image_signed_by_unknown_key_runs_nothing(federation: LocalFederation,
                                                  trust: dict[str, Any]) -> None:
    unregistered = register(federation, trust["original"],
                            sign(SigningKey.generate(), trust["original"]))
    assert unregistered.status_code == 422
    assert "not a registered publisher" in unregistered.json()["detail"]
    # A publisher the hub knows but this spoke does not trust.
    created = register(federation, trust["original"], sign(trust["stranger"], trust["original"]))
    assert created.status_code == 201
    created_since = watch(trust["spoke"])
    final = run_on_spoke(federation, created.json()["id"], trust["spoke"])
    assert final["targets"][0]["state"] == "refused"
    assert "release signature" in final["targets"][0]["reason"]
    assert created_since.stop() == []
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
    created_since = watch(trust["spoke"])
    final = run_on_spoke(federation, algorithm["id"], trust["spoke"])
    assert final["targets"][0]["state"] == "refused"
    assert "not for" in final["targets"][0]["reason"]
    assert created_since.stop() == []
    # The spoke's own audit log names the reason (written beside the refusal it sends).
    deadline = time.monotonic() + 30
    while not any("not for" in e["detail"].get("error", "")
                  for e in spoke_refusals(federation, trust["spoke"])):
        assert time.monotonic() < deadline, "the spoke audited no refusal of the new digest"
        time.sleep(0.3)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tributary.cli", *args], capture_output=True,
                          text=True, timeout=120)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding, written out here from the DSSE spec so the
    stored envelope is checked independently of the project's signing code."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def test_release_signature_pushed_to_registry_in_cosign_layout_is_trusted(
        federation: LocalFederation, trust: dict[str, Any],
        service_settings: ServiceSettings) -> None:
    """A publisher pushes the signature beside the image; a spoke pinning that publisher
    runs the release by key alone, with no signature or digest handed over by anyone."""
    image = tiny_image(federation.root, f"pushed-{uuid.uuid4().hex}", service_settings,
                       uuid.uuid4().hex[:8])
    reference = f"{image[0]}@{image[1]}"
    signed = cli("algorithm", "sign", reference, "--key", str(trust["publisher_key"]),
                 "--name", "trusted-demo", "--version", "1", "--publisher", "Good Publisher",
                 "--push")
    assert signed.returncode == 0, signed.stdout + signed.stderr

    # The layout cosign reads: tag sha256-HEX.att, OCI manifest, DSSE layers annotated with
    # their predicate type, each a valid Ed25519 signature over the DSSE PAE.
    registry, name = image[0].split("/", 1)
    tag = image[1].replace(":", "-") + ".att"
    manifest = httpx.get(f"http://{registry}/v2/{name}/manifests/{tag}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status().json()
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.dsse.envelope.v1+json"
    assert layer["annotations"]["predicateType"] == "https://tributary.dev/algorithm-release/v1"
    envelope = httpx.get(f"http://{registry}/v2/{name}/blobs/{layer['digest']}"
                         ).raise_for_status().json()
    payload = base64.b64decode(envelope["payload"])
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    public = serialization.load_pem_public_key(
        trust["publisher_key"].with_suffix(".key.pub").read_bytes())
    assert isinstance(public, Ed25519PublicKey)
    public.verify(base64.b64decode(envelope["signatures"][0]["sig"]),
                  pae(envelope["payloadType"], payload))  # raises if it does not verify
    statement = json.loads(payload)
    assert statement["subject"][0]["digest"]["sha256"] == image[1].removeprefix("sha256:")

    created = register(federation, image, None)  # the hub was given no signature
    assert created.status_code == 201, created.text
    final = run_on_spoke(federation, created.json()["id"], trust["spoke"])
    assert final["targets"][0]["succeeded"] == 1, final

    # The hub stored its approval there too; both check with the public keys alone.
    publisher_pub = trust["publisher_key"].with_suffix(".key.pub")
    checked = cli("algorithm", "verify", reference, "--key", str(publisher_pub),
                  "--key", f"{federation.hub_key_path}.pub")
    assert checked.returncode == 0, checked.stdout
    assert "verified release" in checked.stdout and "verified approval" in checked.stdout

    # Revoking the approval takes it out of the registry; the publisher's release stays.
    with federation.api() as api:
        api.post(f"/api/algorithms/{created.json()['id']}/revoke",
                 json={"reason": "superseded"}).raise_for_status()
        withdrawn = api.get("/api/audit", params={"action": "attestation.withdrawn"}).json()
        assert [e["target"] for e in withdrawn if e["target"] == reference] == [reference]
    with RegistryClient(registry) as client:
        kinds = [a.predicate_type for a in client.attestations(name, image[1])]
    assert kinds == [RELEASE_TYPE]
    after = cli("algorithm", "verify", reference, "--key", str(publisher_pub),
                "--key", f"{federation.hub_key_path}.pub")
    assert after.returncode == 0, after.stdout
    assert "verified release" in after.stdout and "approval" not in after.stdout
    hub_only = cli("algorithm", "verify", reference, "--key", f"{federation.hub_key_path}.pub")
    assert hub_only.returncode == 1 and "no signature by a trusted key" in hub_only.stdout


def test_forged_signatures_in_registry_run_nothing(
        federation: LocalFederation, trust: dict[str, Any],
        service_settings: ServiceSettings) -> None:
    """Someone with push access to the registry but not the publisher's key: a signature
    by another key and a genuine one whose statement was edited are both refused."""
    image = tiny_image(federation.root, f"forged-{uuid.uuid4().hex}", service_settings,
                       uuid.uuid4().hex[:8])
    other = tiny_image(federation.root, f"other-{uuid.uuid4().hex}", service_settings,
                       uuid.uuid4().hex[:8])
    genuine_for_other = sign(trust["publisher"], other)
    edited = dict(genuine_for_other)
    statement = json.loads(base64.b64decode(edited["payload"]))
    statement["subject"][0]["digest"]["sha256"] = image[1].removeprefix("sha256:")
    edited["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    registry, name = image[0].split("/", 1)
    with RegistryClient(registry) as client:
        client.attach(name, image[1], sign(trust["stranger"], image), RELEASE_TYPE)
        client.attach(name, image[1], edited, RELEASE_TYPE)
    created = register(federation, image, None)
    assert created.status_code == 201
    created_since = watch(trust["spoke"])
    final = run_on_spoke(federation, created.json()["id"], trust["spoke"])
    assert final["targets"][0]["state"] == "refused"
    assert "release signature" in final["targets"][0]["reason"]
    assert created_since.stop() == []
    publisher_pub = trust["publisher_key"].with_suffix(".key.pub")
    checked = cli("algorithm", "verify", f"{image[0]}@{image[1]}", "--key", str(publisher_pub))
    assert checked.returncode == 1
    assert checked.stdout.count("invalid  release") == 2  # and the hub approval: not this key
