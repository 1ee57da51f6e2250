"""The training contract through the real Docker engine: the federated example image, built
offline from wheels, runs init, a fit round and an evaluation on synthetic sites the way a
spoke will run it (cohort and series read-only, the global model read-only, no network,
only the output folder writable), and a probe image shows those mounts hold and that an
update of the wrong shape is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tributary.testbed.federation import generate_cohort
from tributary_algorithm.cli import main as cli_main
from tributary_algorithm.tools import build_image
from tributary_algorithm.tools.localrun import participant_for_series
from tributary_algorithm.tools.localtrain import SiteCase, TrainingSite, run_training_task
from tributary_algorithm.training import RoundConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "examples" / "federated_logreg"
BASE_IMAGE = "tributary/python-base:3.11"
TAG = "tributary-test/federated-logreg:e2e"
PROBE_TAG = "tributary-test/training-probe:e2e"

PROBE = '''
import json, os, socket
from tributary_algorithm.tensors import write_tensors
from tributary_algorithm.training import TrainingAlgorithm, run_training

def _writable(path):
    try:
        with open(path, "w") as handle:
            handle.write("x")
        return 1
    except OSError:
        return 0

def _network():
    try:
        socket.create_connection(("1.1.1.1", 53), timeout=2).close()
        return 1
    except OSError:
        return 0

class Probe(TrainingAlgorithm):
    def fit(self, parameters, data, config):
        if config.config.get("misbehave") == "reshape":  # past the SDK's own check
            write_tensors("/tributary/output/parameters.safetensors",
                          {name: value[:1] for name, value in parameters.items()})
            with open("/tributary/output/output.json", "w") as handle:
                json.dump({"training_contract_version": "1.0", "task": "fit",
                           "num_examples": 1, "loss": None, "metrics": {}}, handle)
            os._exit(0)
        return parameters, len(data.cases), {
            "model_writable": _writable("/tributary/model/global.safetensors"),
            "cohort_writable": _writable("/tributary/cohort.json"),
            "series_writable": _writable(data.cases[0].series[0].path + "/planted"),
            "network": _network(),
            "labelled": sum("nodule_count" in c.labels for c in data.cases)}

    def evaluate(self, parameters, data, config):
        return 0.0, len(data.cases), {}

run_training(Probe())
'''


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed")
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE],
                      capture_output=True, timeout=60).returncode != 0:
        pytest.skip(f"base image {BASE_IMAGE} is not built (no Docker Hub here)")
    build_image(EXAMPLE_DIR, TAG, base_image=BASE_IMAGE)
    return TAG


@pytest.fixture(scope="module")
def probe(image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    context = tmp_path_factory.mktemp("probe")
    (context / "probe.py").write_text(PROBE)
    (context / "Dockerfile").write_text(
        f"FROM {image}\nCOPY probe.py /opt/algorithm/probe.py\n"
        'ENTRYPOINT ["python3", "/opt/algorithm/probe.py"]\n')
    subprocess.run(["docker", "build", "--network", "none", "-q", "-t", PROBE_TAG,
                    str(context)], check=True, capture_output=True, timeout=300)
    return PROBE_TAG


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("sites")
    for n in range(2):
        generate_cohort(root / f"site{n}", 4, seed=60 + n, site=f"Site {n}", size=64,
                        slices=16, scanner=n)
    return [root / "site0", root / "site1"]


def test_a_round_of_the_example_through_docker(image: str, sites: list[Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    status = cli_main(["test", "--training", image, "--site", str(sites[0]),
                       "--site", str(sites[1]), "--rounds", "1", "--json",
                       "--timeout", "120", "--memory-mb", "512"])
    out = capsys.readouterr().out
    assert status == 0, out
    history = json.loads(out.strip().splitlines()[-1])
    assert history[0]["round"] == 1 and history[0]["participants"] == 2
    assert 0.0 <= history[0]["metrics"]["accuracy"] <= 1.0 and history[0]["loss"] > 0


def _site(folder: Path) -> TrainingSite:
    truth = json.loads((folder / "ground_truth.json").read_text())
    cases = tuple(
        SiteCase(f"c-{i:016x}", participant_for_series([folder / name], f"c-{i:016x}"),
                 {"nodule_count": len(truth[name]["nodules"])})
        for i, name in enumerate(sorted(truth)))
    return TrainingSite(folder.name, cases)


def test_the_sandbox_holds_and_a_wrong_update_is_refused(probe: str, sites: list[Path]) -> None:
    site = _site(sites[0])
    model = {"weights": np.arange(6, dtype=np.float64), "bias": np.zeros(1)}
    result = run_training_task(probe, site, RoundConfig(round=1, task="fit"), model,
                               timeout=120, memory_mb=512)
    assert result.ok, f"{result.problem}: {result.stderr[-1500:]}"
    assert result.output is not None
    assert result.output["metrics"] == {"model_writable": 0, "cohort_writable": 0,
                                        "series_writable": 0, "network": 0, "labelled": 4}
    assert result.output["num_examples"] == 4
    np.testing.assert_array_equal(result.parameters["weights"], model["weights"])
    bad = run_training_task(probe, site, RoundConfig(round=1, task="fit",
                                                     config={"misbehave": "reshape"}),
                            model, timeout=120, memory_mb=512)
    assert not bad.ok and "parameters" in (bad.problem or "")
    assert "model's" in (bad.problem or "")
