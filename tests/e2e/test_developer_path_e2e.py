"""An algorithm developer's whole path from an empty folder, with the commands the docs
show (docs/algorithm-sdk.md): ``tributary-algorithm init``, ``test`` on a cohort
de-identified by the spoke's engine, ``tributary algorithm publish`` (build, push, sign,
register), two reviews through the CLI, a launch on a local federation watched to the end,
and the results fetched. Then the same version on a spoke that trusts another publisher:
every target refuses, and ``study launch --watch`` and ``study watch`` say why and exit 1."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tributary.protocol.signing import SigningKey
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    wide = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", **(env or {})}
    return subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=wide)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def login(federation: LocalFederation, work: Path, username: str, password: str) -> str:
    done = run(BIN / "tributary", "login", username, "--hub", federation.hub_url, cwd=work,
               env={"TRIBUTARY_PASSWORD": password})
    return ok(done).strip()


@pytest.fixture
def name(service_settings: ServiceSettings) -> Iterator[str]:
    """A fresh algorithm name; the local images the test tags with it are removed after."""
    name = f"devpath-{uuid.uuid4().hex[:6]}"
    yield name
    tags = [f"{name}:test", f"{name}:0.1.0",
            f"{service_settings.registry}/algorithms/{name}:0.1.0"]
    subprocess.run(["docker", "rmi", *tags], capture_output=True, check=False)


def test_from_an_empty_folder_to_results(federation: LocalFederation,
                                         service_settings: ServiceSettings,
                                         tmp_path: Path, name: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    hub = {"TRIBUTARY_HUB_URL": federation.hub_url}

    # 1. init: a runnable algorithm, from nothing
    made = ok(run(BIN / "tributary-algorithm", "init", name, cwd=work))
    assert "algorithm.toml" in made and (work / name / "Dockerfile").is_file()

    # 2. test on a cohort, one case per patient, de-identified by the spoke's engine
    generate_cohort(work / "cohort", 3, seed=5, site="Dev Hospital", size=64, slices=16)
    tested = ok(run(BIN / "tributary-algorithm", "test", name, "--cohort", "cohort",
                    "--base-image", service_settings.base_image, cwd=work))
    assert "de-identified by the spoke's own engine (tributary.spoke.deid" in tested
    assert "3 of 3 case(s) succeeded" in tested
    assert "MRN" not in tested.split("ingesting", 1)[1].split("\n", 1)[1]  # no identifiers
    not_a_cohort = run(BIN / "tributary-algorithm", "test", f"{name}:test", "--dicom", "cohort",
                       cwd=work)
    assert not_a_cohort.returncode == 1 and "3 patients" in not_a_cohort.stderr

    # 3. a publisher key, registered by the hub's administrator from the CLI
    ok(run(BIN / "tributary", "algorithm", "keygen", "publisher.key", cwd=work))
    registered = ok(run(BIN / "tributary", "publisher", "register", "Dev Lab", "--key",
                        "publisher.key.pub", cwd=work,
                        env={**hub, "TRIBUTARY_TOKEN": federation.admin_token}))
    assert "registered publisher Dev Lab" in registered

    # 4. publish as a developer: build, push, sign, register; the review link printed
    developer_password = uuid.uuid4().hex
    with federation.api() as api:
        api.post("/api/users", json={"username": f"dev-{name}", "password": developer_password,
                                     "roles": ["developer"], "organisation": "Dev Lab"}
                 ).raise_for_status()
    developer = login(federation, work, f"dev-{name}", developer_password)
    published = ok(run(BIN / "tributary", "algorithm", "publish", name, "--key",
                       "publisher.key", "--registry", service_settings.registry,
                       "--base-image", service_settings.base_image, cwd=work,
                       env={**hub, "TRIBUTARY_TOKEN": developer}))
    algorithm_id = int(published.strip().splitlines()[-1])
    assert f"{federation.hub_url}/algorithms/{algorithm_id}" in published
    assert "signed      release" in published
    again = run(BIN / "tributary", "algorithm", "publish", name, "--key", "publisher.key",
                "--registry", service_settings.registry, cwd=work,
                env={**hub, "TRIBUTARY_TOKEN": developer})
    assert again.returncode == 1 and "already registered" in again.stderr  # nothing rebuilt

    # 5. two reviews through the CLI, by reviewers of two organisations
    for index, (username, password, _) in enumerate(federation.reviewers()):
        token = login(federation, work, username, password)
        reviewed = ok(run(BIN / "tributary", "algorithm", "review", str(algorithm_id),
                          "--approve", "--comment", "read it", cwd=work,
                          env={**hub, "TRIBUTARY_TOKEN": token}))
        assert ("now approved" in reviewed) == (index == 1), reviewed
    shown = ok(run(BIN / "tributary", "algorithm", "show", str(algorithm_id), cwd=work,
                   env={**hub, "TRIBUTARY_TOKEN": developer}))
    assert "approved" in shown and "publisher  Dev Lab" in shown

    # 6. launch on a spoke that trusts this publisher; watch; fetch the results
    spoke = f"devsite-{uuid.uuid4().hex[:6]}"
    generate_cohort(tmp_path / spoke, 3, seed=6, site="Site Hospital", size=64, slices=16)
    config = federation.add_spoke(spoke, tmp_path / spoke,
                                  publisher_keys=(work / "publisher.key.pub",))
    federation.start_spoke(spoke, config)
    coordinator = {**hub, "TRIBUTARY_TOKEN": federation.admin_token}
    launched = ok(run(BIN / "tributary", "study", "launch", "--name", "dev path",
                      "--algorithm", str(algorithm_id), "--spoke", spoke, "--watch",
                      cwd=work, env=coordinator))
    study = re.search(r"^created (\S+)", launched, re.MULTILINE)
    assert study is not None, launched
    assert f"{study.group(1)} is completed" in launched
    ok(run(BIN / "tributary", "study", "fetch", study.group(1), "--out", "results", cwd=work,
           env=coordinator))
    rows = list(csv.DictReader((work / "results" / f"{study.group(1)}-results.csv").open()))
    assert len(rows) == 3 and all(r["state"] == "succeeded" for r in rows), rows
    assert {r["output.instances"] for r in rows} == {"16"}

    # 7. a spoke that trusts another publisher refuses: watch says why and exits 1
    stranger = tmp_path / "stranger.pub"
    stranger.write_text(SigningKey.generate().public.pem)
    strict = f"strict-{uuid.uuid4().hex[:6]}"
    generate_cohort(tmp_path / strict, 1, seed=7, site="Strict Hospital", size=64, slices=16)
    federation.start_spoke(strict, federation.add_spoke(strict, tmp_path / strict,
                                                        publisher_keys=(stranger,)))
    refused = run(BIN / "tributary", "study", "launch", "--name", "refused", "--algorithm",
                  str(algorithm_id), "--spoke", strict, "--watch", cwd=work, env=coordinator)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"{strict} refused: image_not_trusted: release signature" in refused.stdout
    refused_id = refused.stdout.split("created ", 1)[1].split()[0]
    watched = run(BIN / "tributary", "study", "watch", refused_id, cwd=work, env=coordinator)
    assert watched.returncode == 1
    assert "1 of 1 spoke(s) did not run it" in watched.stdout
    assert f"{strict} refused: image_not_trusted: release signature" in watched.stdout

    # 8. limits from the command line reach the hub, which refuses before sending anything
    #    a study asking for a GPU on a spoke whose heartbeats report none, naming why
    gpu = run(BIN / "tributary", "study", "launch", "--name", "wants a gpu", "--algorithm",
              str(algorithm_id), "--spoke", spoke, "--gpus", "1", "--tmp-mb", "64",
              "--timeout", "120", "--watch", cwd=work, env=coordinator)
    assert gpu.returncode == 1, gpu.stdout + gpu.stderr
    assert "nothing was sent" in gpu.stderr, gpu.stderr
    assert f"{spoke}: gpus: the study asks for 1 GPU(s) per case; this site offers none" \
        in gpu.stderr
    gpu_id = gpu.stdout.split("created ", 1)[1].split()[0]
    limits = httpx.get(f"{federation.hub_url}/api/experiments/{gpu_id}", headers={
        "Authorization": f"Bearer {federation.admin_token}"}).json()["limits"]
    assert (limits["gpus"], limits["tmp_mb"], limits["timeout_seconds"]) == (1, 64, 120)


def test_a_scaffold_in_another_language_passes_as_written(
        service_settings: ServiceSettings, tmp_path: Path) -> None:
    """``--language other``: a shell entry point and vendor/ for offline dependencies,
    built and run in the spoke's sandbox on its sample case, with the base image from the
    environment as on a machine without Docker Hub."""
    ok(run(BIN / "tributary-algorithm", "init", "any-lang", "--language", "other",
           cwd=tmp_path))
    try:
        tested = ok(run(BIN / "tributary-algorithm", "test", "any-lang", cwd=tmp_path,
                        env={"TRIBUTARY_BASE_IMAGE": service_settings.base_image}))
    finally:
        subprocess.run(["docker", "rmi", "any-lang:test"], capture_output=True, check=False)
    assert "outcome: success" in tested and '"instances": 2' in tested
