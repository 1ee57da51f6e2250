"""Trust made visible and the sandbox lane, against the real broker, registry, Docker engine,
hub and spoke processes. A version signed by a publisher the site does not trust is refused
at the hub with the reason before anything is sent; once the site's steward trusts the key
from the spoke's command line (no TOML edited, no restart) the same launch runs. A
developer's unreviewed version runs on the sandbox spoke, and a real spoke refuses it even
when the hub is made to send it there."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from sqlmodel import Session

from tributary.hub.db import make_engine
from tributary.hub.models import Spoke
from tributary.protocol.release import sign_release
from tributary.protocol.signing import SigningKey
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, build_and_push, generate_cohort

pytestmark = pytest.mark.e2e


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tributary.cli", *args], capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory,
          service_settings: ServiceSettings) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("trust")
    federation = LocalFederation(root, service_settings, launch_trust_check="strict")
    federation.start_hub()
    suffix = uuid.uuid4().hex[:6]
    site_publisher, newcomer = SigningKey.generate(), SigningKey.generate()
    (root / "site.pub").write_text(site_publisher.public.pem)
    (root / "newcomer.pub").write_text(newcomer.public.pem)
    real, sandbox = f"site-{suffix}", f"sandbox-{suffix}"
    for spoke_id, is_sandbox in ((real, False), (sandbox, True)):
        data = root / "data" / spoke_id
        generate_cohort(data, 1, seed=5, site=spoke_id)
        config = federation.add_spoke(spoke_id, data, sandbox=is_sandbox,
                                      publisher_keys=(root / "site.pub",))
        federation.start_spoke(spoke_id, config)
    developer = {"username": f"dev-{suffix}", "password": secrets.token_urlsafe(18)}
    with federation.api() as api:
        for name, key in (("Site Publisher", site_publisher), ("Newcomer Lab", newcomer)):
            api.post("/api/publishers", json={"name": name, "public_key_pem": key.public.pem}
                     ).raise_for_status()
        api.post("/api/users", json={**developer, "roles": ["developer"]}).raise_for_status()
    build = root / "image"
    build.mkdir()
    (build / "Dockerfile").write_text(
        "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}\n"
        f"LABEL stamp={suffix}\nUSER 65534:65534\n"
        'ENTRYPOINT ["python3", "-c", "import json, os; a = json.loads(os.environ[\'ALGO_ARG\']);'
        " json.dump({'ok': 1}, open(a['output'], 'w'))\"]\n")
    name = f"trust-{suffix}"
    image = build_and_push(build, name, "1", service_settings)
    federation.wait_for_trust([real, sandbox])
    yield {"federation": federation, "real": real, "sandbox": sandbox, "image": image,
           "newcomer": newcomer, "developer": developer, "name": name, "root": root}
    federation.stop()
    engine = docker.from_env()  # only the local tag this module made
    with contextlib.suppress(docker.errors.APIError):
        engine.images.remove(f"tributary/{name}:1", noprune=True)
    engine.close()


def register(federation: LocalFederation, image: tuple[str, str], key: SigningKey,
             name: str, version: str, token: str | None = None,
             approve: bool = True) -> dict[str, Any]:
    release = sign_release(key, image[0], image[1], name, version, "Newcomer Lab")
    with federation.api(token) as api:
        response = api.post("/api/algorithms", json={
            "name": name, "version": version, "repository": image[0], "digest": image[1],
            "release_signature": release})
        assert response.status_code == 201, response.text
        algorithm: dict[str, Any] = response.json()
    if approve:
        for reviewer in federation.reviewer_tokens():
            with federation.api(reviewer) as api:
                algorithm = api.post(f"/api/algorithms/{algorithm['id']}/reviews",
                                     json={"decision": "approve"}).raise_for_status().json()
    return algorithm


def test_untrusted_publisher_refused_at_the_hub_then_trusted_from_the_site_cli(
        world: dict[str, Any]) -> None:
    federation: LocalFederation = world["federation"]
    real = world["real"]
    algorithm = register(federation, world["image"], world["newcomer"], world["name"], "1")
    with federation.api() as api:
        verdicts = {v["spoke_id"]: v for v in
                    api.get(f"/api/algorithms/{algorithm['id']}/trust").json()}
        assert not verdicts[real]["runs"]
        assert "does not trust Newcomer Lab" in verdicts[real]["reason"]
        page = api.get(f"/algorithms/{algorithm['id']}").text
        assert "will not run this version" in page and "does not trust Newcomer Lab" in page
        experiment = api.post("/api/experiments", json={
            "name": "trust", "algorithm_id": algorithm["id"], "spoke_ids": [real]}
        ).raise_for_status().json()
        refused = api.post(f"/api/experiments/{experiment['id']}/launch")
        assert refused.status_code == 409, refused.text
        detail = refused.json()["detail"]
        assert "nothing was sent" in detail["message"]
        assert [r["spoke_id"] for r in detail["refusals"]] == [real]
        assert "does not trust Newcomer Lab" in detail["refusals"][0]["reason"]
        again = api.get(f"/api/experiments/{experiment['id']}").json()
        assert again["state"] == "draft" and again["targets"][0]["state"] == "pending"
    # The CLI names the reason and exits 1.
    launched = cli("study", "launch", "--hub", federation.hub_url, "--token",
                   federation.admin_token, "--name", "trust cli", "--algorithm",
                   str(algorithm["id"]), "--spoke", real)
    assert launched.returncode == 1, launched.stdout + launched.stderr
    assert "does not trust Newcomer Lab" in launched.stderr
    assert f"{real}:" in launched.stderr

    # The site's steward trusts the key from the spoke's CLI; the running spoke reports it.
    spoke_process = federation.processes[f"spoke-{real}"]
    config = federation.root / "spokes" / real / "spoke.toml"
    added = cli("spoke", "trust", "add", str(world["root"] / "newcomer.pub"), "--config",
                str(config), "--name", "Newcomer Lab", "--steward", "Dr Steward",
                "--reason", "reviewed their release process")
    assert added.returncode == 0, added.stdout + added.stderr
    listed = json.loads(cli("spoke", "trust", "list", "--config", str(config),
                            "--json").stdout)
    assert world["newcomer"].keyid in [p["keyid"] for p in listed["publishers"]]
    federation.wait_for_trust([real], timeout=20, keyid=world["newcomer"].keyid)
    assert federation.processes[f"spoke-{real}"] is spoke_process and spoke_process.alive()
    with federation.api() as api:
        api.post(f"/api/experiments/{experiment['id']}/launch").raise_for_status()
    final = federation.wait_for_experiment(experiment["id"], timeout=120)
    assert final["targets"][0]["succeeded"] == 1, final["targets"]
    audit = [json.loads(line) for line in
             (federation.root / "spokes" / real / "audit.jsonl").read_text().splitlines()]
    added_entry = [e for e in audit if e["action"] == "trust.publisher_added"]
    assert added_entry and added_entry[0]["actor"] == "Dr Steward"
    assert added_entry[0]["detail"]["reason"] == "reviewed their release process"

    # Removing it takes effect the same way: the hub refuses again.
    removed = cli("spoke", "trust", "remove", world["newcomer"].keyid[:12], "--config",
                  str(config), "--steward", "Dr Steward", "--reason", "key rotated")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    with federation.api() as api:
        for _ in range(60):
            spoke = api.get(f"/api/spokes/{real}").json()
            if world["newcomer"].keyid not in spoke["trusted_publishers"]:
                break
            time.sleep(0.3)
        verdict = {v["spoke_id"]: v for v in
                   api.get(f"/api/algorithms/{algorithm['id']}/trust").json()}[real]
    assert not verdict["runs"]


def test_sandbox_runs_an_unreviewed_version_and_a_real_spoke_refuses_it(
        world: dict[str, Any]) -> None:
    federation: LocalFederation = world["federation"]
    real, sandbox = world["real"], world["sandbox"]
    developer = federation.sign_in(**world["developer"])
    algorithm = register(federation, world["image"], world["newcomer"], world["name"], "2-dev",
                         token=developer, approve=False)
    assert algorithm["approval"] is None
    watched = LocalFederation.watch_containers(f"org.tributary.spoke={real}")

    tried = cli("algorithm", "try", str(algorithm["id"]), "--hub", federation.hub_url,
                "--token", developer)
    assert tried.returncode == 0, tried.stdout + tried.stderr
    found = re.search(r"^(exp-[0-9a-f]{12})$", tried.stdout, re.MULTILINE)
    assert found, tried.stdout
    experiment_id = found.group(1)
    with federation.api(developer) as api:
        study = api.get(f"/api/experiments/{experiment_id}").json()
        assert study["sandbox"] and study["owner"] == world["developer"]["username"]
        assert [t["spoke_id"] for t in study["targets"]] == [sandbox]
        assert study["targets"][0]["succeeded"] == 1
        cases = api.get(f"/api/experiments/{experiment_id}/cases")
        assert cases.status_code == 200 and cases.json()[0]["state"] == "succeeded"
        # Only sandbox spokes, and only the version's own developer.
        onto_real = api.post(f"/api/algorithms/{algorithm['id']}/try",
                             json={"spoke_ids": [real]})
        assert onto_real.status_code == 409 and "not sandbox spokes" in onto_real.text
    with federation.api() as api:
        other = api.post(f"/api/algorithms/{algorithm['id']}/try")
        assert other.status_code == 409 and "own developer" in other.text
        ordinary = api.post("/api/experiments", json={
            "name": "x", "algorithm_id": algorithm["id"], "spoke_ids": [real]})
        assert ordinary.status_code == 422 and "not approved" in ordinary.text

    # A hub told the real spoke is a sandbox (a misconfiguration or a compromised hub
    # database) sends it the sandbox grant: the spoke refuses it and nothing runs.
    engine = make_engine(f"sqlite:///{federation.root / 'hub.db'}")
    with Session(engine) as session:
        row = session.get(Spoke, real)
        assert row is not None
        row.sandbox, row.trust_sandbox = True, True
        session.add(row)
        session.commit()
    with federation.api(developer) as api:
        sent = api.post(f"/api/algorithms/{algorithm['id']}/try", json={"spoke_ids": [real]})
    assert sent.status_code == 201, sent.text
    final = federation.wait_for_experiment(sent.json()["id"], timeout=60)
    target = final["targets"][0]
    assert target["state"] == "refused", target
    assert "sandbox grant" in target["reason"] and "runs only versions approved" in target["reason"]
    assert watched.stop() == []
    with Session(engine) as session:
        row = session.get(Spoke, real)
        assert row is not None
        row.sandbox = False
        session.add(row)
        session.commit()
