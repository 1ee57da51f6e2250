"""The federated training example learns: FedAvg over three non-IID synthetic sites reaches
the accuracy and loss of the same model trained centrally on the pooled data, on a held-out
test set. Also: the generator's per-site scanners, and its default output unchanged."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest

from tributary_algorithm.training import RoundConfig, simulate

REPO = Path(__file__).resolve().parents[2]
SIZE, SLICES = 64, 16  # small images: the whole file runs in seconds
ROUNDS = 10
#: Federated within this much of centralised, on the held-out set.
ACCURACY_TOLERANCE = 0.05
LOSS_TOLERANCE = 0.05


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


generate = _load("synthetic_ct_generate", REPO / "examples" / "synthetic_ct" / "generate.py")
logreg = _load("federated_logreg", REPO / "examples" / "federated_logreg" / "logreg.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("training")
    sites, test = [], []
    for n in range(3):  # each site its own scanner; the test set mixes all three
        generate.generate_cohort(root / f"site{n}", 8, seed=100 + n, site=f"Site {n}",
                                 size=SIZE, slices=SLICES, scanner=n)
        generate.generate_cohort(root / f"test{n}", 4, seed=200 + n, site=f"Site {n}",
                                 size=SIZE, slices=SLICES, scanner=n)
        sites.append(logreg.cohort_data(root / f"site{n}"))
        test.append(logreg.cohort_data(root / f"test{n}"))
    return {"root": root, "sites": sites, "test": test}


def test_sites_are_not_identically_distributed(data: dict) -> None:
    algorithm = logreg.NoduleClassifier()
    means = [algorithm.dataset(site)[0][:, logreg.FEATURES.index("mean_hu")].mean()
             for site in data["sites"]]
    assert max(means) - min(means) > 0.1  # scanner calibration shows in the features


def test_fedavg_matches_central_training_on_a_held_out_set(data: dict) -> None:
    algorithm = logreg.NoduleClassifier()
    x_test, y_test = logreg.pooled(algorithm, data["test"])
    assert 0 < y_test.mean() < 1
    initial = algorithm.init(RoundConfig(round=0, task="init"))
    final, history = simulate(algorithm, data["sites"], ROUNDS,
                              base=RoundConfig(round=0, local_epochs=1))
    assert [r.participants for r in history] == [3] * ROUNDS
    assert history[-1].eval_loss < history[0].eval_loss
    root = data["root"]
    result = logreg.compare([root / f"site{n}" for n in range(3)],
                            [root / f"test{n}" for n in range(3)], final, ROUNDS)
    fed, cen = result["federated"], result["centralised"]
    # the untrained model says "no nodule" to every case
    assert logreg.scores(initial, x_test, y_test)["accuracy"] <= 0.5
    assert fed["accuracy"] >= 0.9 and cen["accuracy"] >= 0.9
    assert abs(fed["accuracy"] - cen["accuracy"]) <= ACCURACY_TOLERANCE
    assert abs(fed["loss"] - cen["loss"]) <= LOSS_TOLERANCE


def test_fedprox_keeps_local_models_near_the_global_one(data: dict) -> None:
    algorithm = logreg.NoduleClassifier()
    start = algorithm.init(RoundConfig(round=0, task="init"))
    drift = []
    for mu in (0.0, 5.0):
        fitted, _, _ = algorithm.fit(start, data["sites"][0],
                                     RoundConfig(round=1, local_epochs=3, proximal_mu=mu))
        drift.append(np.linalg.norm(fitted["weights"] - start["weights"]))
    assert drift[1] < drift[0]


def test_generator_default_is_unchanged_and_scanners_differ(tmp_path: Path) -> None:
    default = generate.generate_cohort(tmp_path / "d", 2, seed=5, size=SIZE, slices=SLICES)
    zero = generate.generate_cohort(tmp_path / "z", 2, seed=5, size=SIZE, slices=SLICES,
                                    scanner=0)
    other = generate.generate_cohort(tmp_path / "o", 2, seed=5, size=SIZE, slices=SLICES,
                                     scanner=1)
    assert default == zero and sorted(default) == sorted(other)
    for folder in default:
        files = sorted((tmp_path / "d" / folder).iterdir())
        assert [f.read_bytes() for f in files] == [
            f.read_bytes() for f in sorted((tmp_path / "z" / folder).iterdir())]
        first = pydicom.dcmread(files[0])
        changed = pydicom.dcmread(sorted((tmp_path / "o" / folder).iterdir())[0])
        assert (first.SliceThickness, first.ManufacturerModelName) == (2.5, "Phantom 160")
        profile = generate.SCANNERS[1]
        assert changed.SliceThickness == profile.slice_thickness_mm
        assert changed.ManufacturerModelName == profile.model
        assert len(default[folder]["nodules"]) == len(other[folder]["nodules"])
