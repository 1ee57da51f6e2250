"""``make demo-containers`` exactly as the README has a user run it: from a shell, in the
checkout, as whoever runs the tests (root on a fresh machine, with root's own home), and
the state folder wherever the command chooses. One run (about three minutes) serves every
test here: the study's results, and what each role's image holds and lacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tributary.testbed.compose import ROOT, SPOKES
from tributary.testbed.federation import LocalFederation, free_port

pytestmark = pytest.mark.e2e

#: What a login shell gives root on Debian: nothing of the test run's own environment.
SHELL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The hub's web stack, worker and plots: a spoke never needs them.
HUB_ONLY = ("fastapi", "uvicorn", "celery", "matplotlib", "alembic", "sqlmodel")
#: DICOM and the Docker engine's client: a hub never needs them.
SPOKE_ONLY = ("pydicom", "docker")


def shell_environment() -> dict[str, str]:
    """A user's shell: their home, the system PATH, a wide terminal (so that printed paths
    are not wrapped) and no TRIBUTARY_ or XDG_ variable of the test run."""
    home = str(Path.home()) if os.geteuid() != 0 else "/root"
    return {"HOME": home, "PATH": SHELL_PATH, "LANG": "C.UTF-8", "COLUMNS": "200",
            "USER": "root" if os.geteuid() == 0 else os.environ.get("USER", "")}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, list[str]]]:
    """Run ``make demo-containers`` once: its output, and the algorithm containers each
    spoke asked the engine for. Ports are free ones, passed the way a user would
    (DEMO_ARGS), so the run does not disturb the suite's shared services."""
    args = (f"--no-wait --cases 2,1,1 --hub-port {free_port()} "
            f"--broker-port {free_port()} --registry-port {free_port()}")
    watches = {spoke: LocalFederation.watch_containers(f"org.tributary.spoke={spoke}")
               for spoke in SPOKES}
    log = tmp_path_factory.mktemp("demo-containers") / "make.log"
    command = ["make", "demo-containers", f"DEMO_ARGS={args}"]
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        command.append(f"VENV={sys.prefix}")  # the tests' own environment, not a second one
    done = subprocess.run(command, cwd=ROOT,
                          env=shell_environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1200)
    log.write_text(done.stdout)
    created = {spoke: watch.stop() for spoke, watch in watches.items()}
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout, created


def test_make_demo_containers_prints_the_study_results(
        demo_run: tuple[str, dict[str, list[str]]]) -> None:
    output, created = demo_run
    assert "6. Results" in output and "Aggregated results (nodule-detection)" in output
    match = re.search(r"Full results: (\S+results\.json)", output)
    assert match, output[-2000:]
    results = Path(match.group(1))
    report = json.loads(results.read_text())
    pooled = report["groups"]["pooled"]
    assert (pooled["cases"], pooled["succeeded"], pooled["failed"]) == (4, 4, 0)
    assert set(report["groups"]) == {*SPOKES, "pooled"}
    state = results.parent
    for spoke in SPOKES:
        # Every spoke checked the publisher's signature before running anything...
        audit = state / "spokes" / spoke / "audit.jsonl"
        entries = [json.loads(line) for line in audit.read_text().splitlines()]
        verified = [e for e in entries if e["action"] == "image.verified"]
        assert verified and all(e["detail"]["result"] == "verified" for e in verified)
        # ...and asked the engine for the algorithm's containers.
        assert created[spoke]
    hub_log = (state / "hub" / "hub-audit.jsonl").read_text()
    assert "experiment.launched" in hub_log or "launch" in hub_log


def installed(image: str) -> set[str]:
    """The distributions installed in ``image``, lower-case."""
    listed = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python3", image, "-m",
                             "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True).stdout
    return {entry["name"].lower() for entry in json.loads(listed)}


def consistent(image: str) -> bool:
    """Whether every installed distribution's requirements are met, for the image's own
    Python (whose markers may select other dependencies than the host's)."""
    return subprocess.run(["docker", "run", "--rm", "--entrypoint", "python3", image, "-m",
                           "pip", "check"], capture_output=True).returncode == 0


def importable(image: str, module: str) -> bool:
    return subprocess.run(["docker", "run", "--rm", "--entrypoint", "python3", image, "-c",
                           f"import {module}"], capture_output=True).returncode == 0


def test_the_spoke_image_holds_no_hub_stack(demo_run: tuple[str, dict[str, list[str]]]) -> None:
    packages = installed("tributary/spoke:dev")
    assert {"tributary-protocol", "tributary-spoke", "pydicom", "docker"} <= packages
    assert not packages & {*HUB_ONLY, "tributary-hub", "tributary"}
    assert consistent("tributary/spoke:dev")
    assert not importable("tributary/spoke:dev", "fastapi")
    assert importable("tributary/spoke:dev", "tributary.spoke.commands.app")


def test_the_hub_image_holds_no_spoke_stack(demo_run: tuple[str, dict[str, list[str]]]) -> None:
    packages = installed("tributary/hub:dev")
    assert {"tributary-protocol", "tributary-hub", "psycopg", *HUB_ONLY} <= packages
    assert not packages & {*SPOKE_ONLY, "tributary-spoke", "tributary"}
    assert consistent("tributary/hub:dev")
    assert not importable("tributary/hub:dev", "pydicom")
    assert importable("tributary/hub:dev", "tributary.hub.commands.app")
