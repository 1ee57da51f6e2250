"""A federated training algorithm on the synthetic chest CT cohorts: does a case have a lung
nodule? Each site extracts image features from its own CT series and trains a logistic
regression on them; only the model's 6 numbers leave a site.

The features are computed here, from the pixels, as a site's algorithm would:

- the volume of soft tissue fully enclosed by lung in an axial slice (a nodule; the body
  wall, mediastinum and spine always touch something other than lung),
- the number of such blobs in 3D,
- the volume's mean and spread of intensity and its lung fraction, which differ between
  scanners (calibration, noise, slice thickness) and so make the sites non-IID.

``fit`` runs full-batch gradient descent on the log loss (plus FedProx's proximal term when
the study sets ``proximal_mu``), ``evaluate`` reports loss and accuracy, ``init`` returns
zeros. :func:`train_central` trains the same model on pooled features, for comparison.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tributary_algorithm import Series
from tributary_algorithm.errors import UnsuitableInput
from tributary_algorithm.training import (
    RoundConfig,
    TrainingAlgorithm,
    TrainingCase,
    TrainingData,
)

FEATURES = ("nodule_volume", "nodule_blobs", "mean_hu", "sd_hu", "lung_fraction")
#: Below this (HU) a voxel is lung or air. Midway between lung (-850) and soft tissue (40),
#: so a scanner's calibration error of tens of HU does not move it across.
LUNG_HU = -500.0
DEFAULT_LEARNING_RATE = 0.5
STEPS_PER_EPOCH = 20
L2 = 1e-3


def volume_hu(series: Series) -> np.ndarray:
    """The series as a (slices, rows, columns) array of HU, ordered along z."""
    datasets = series.datasets()
    if not datasets:
        raise UnsuitableInput(f"series {series.series_id} holds no readable DICOM")
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1))
                     + float(ds.get("RescaleIntercept", 0)) for ds in datasets])


def features_of(volume: np.ndarray) -> np.ndarray:
    """The case's feature vector (scaled to about unit range by fixed constants: a site
    cannot standardise with statistics of data it does not have)."""
    from scipy import ndimage

    dark = volume < LUNG_HU
    lung = np.zeros_like(dark)
    enclosed = np.zeros_like(dark)
    for k, layer in enumerate(dark):
        labels, _ = ndimage.label(layer)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        lung[k] = layer & ~np.isin(labels, border)  # dark but not the air around the body
        enclosed[k] = ndimage.binary_fill_holes(lung[k]) & ~lung[k]
    _, blobs = ndimage.label(enclosed)
    return np.array([np.log1p(enclosed.sum()) / 5.0, min(blobs, 6) / 3.0,
                     (float(volume.mean()) + 500.0) / 500.0, float(volume.std()) / 500.0,
                     float(lung.mean()) * 5.0])


def label_of(case: TrainingCase) -> float:
    """1 when the case has at least one nodule (the site's ``nodule_count`` attribute)."""
    if "nodule_count" not in case.labels:
        raise UnsuitableInput(f"case {case.case_id} has no nodule_count label")
    return 1.0 if float(case.labels["nodule_count"]) > 0 else 0.0


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def log_loss(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(_sigmoid(x @ w + b), 1e-9, 1 - 1e-9)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def accuracy(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x @ w + b > 0) == (y > 0.5)))


def gradient_descent(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray, steps: int,
                     lr: float, mu: float = 0.0, anchor: tuple[np.ndarray, float] | None = None
                     ) -> tuple[np.ndarray, float]:
    """``steps`` full-batch steps on the L2-regularised log loss, plus mu/2 ||θ - anchor||²."""
    w, b = w.astype(np.float64).copy(), float(b)
    aw, ab = anchor if anchor is not None else (w.copy(), b)
    # The proximal term adds mu to the loss's curvature: a step over 2/curvature diverges.
    lr = min(lr, 1.0 / (1.0 + L2 + mu))
    for _ in range(steps):
        error = _sigmoid(x @ w + b) - y
        gw = x.T @ error / len(y) + L2 * w + mu * (w - aw)
        gb = float(error.mean()) + mu * (b - ab)
        w, b = w - lr * gw, b - lr * gb
    return w, b


class NoduleClassifier(TrainingAlgorithm):
    """The training algorithm. Features are cached per series folder, so a process that
    runs many rounds (the in-process simulation) reads each case once."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, ...], np.ndarray] = {}

    def dataset(self, data: TrainingData) -> tuple[np.ndarray, np.ndarray]:
        rows, labels = [], []
        for case in data.cases:
            key = tuple(s.path for s in case.series)
            if key not in self._cache:
                ct = [s for s in case.series if s.modality.upper() == "CT"]
                if not ct:
                    raise UnsuitableInput(f"case {case.case_id} has no CT series")
                self._cache[key] = features_of(volume_hu(ct[0]))
            rows.append(self._cache[key])
            labels.append(label_of(case))
        if not rows:
            raise UnsuitableInput("no cases to train on")
        return np.array(rows), np.array(labels)

    def init(self, config: RoundConfig) -> dict[str, np.ndarray]:
        return {"weights": np.zeros(len(FEATURES)), "bias": np.zeros(1)}

    def fit(self, parameters, data, config):
        x, y = self.dataset(data)
        w0, b0 = parameters["weights"], float(parameters["bias"][0])
        w, b = gradient_descent(w0, b0, x, y, config.local_epochs * STEPS_PER_EPOCH,
                                config.learning_rate or DEFAULT_LEARNING_RATE,
                                config.proximal_mu, (w0, b0))
        return ({"weights": w, "bias": np.array([b])}, len(y),
                {"loss": log_loss(w, b, x, y), "accuracy": accuracy(w, b, x, y)})

    def evaluate(self, parameters, data, config):
        x, y = self.dataset(data)
        w, b = parameters["weights"], float(parameters["bias"][0])
        return log_loss(w, b, x, y), len(y), {"accuracy": accuracy(w, b, x, y)}


def train_central(x: np.ndarray, y: np.ndarray, steps: int,
                  lr: float = DEFAULT_LEARNING_RATE) -> dict[str, np.ndarray]:
    """The same model trained on the pooled data of every site (what federated training is
    compared with)."""
    w, b = gradient_descent(np.zeros(x.shape[1]), 0.0, x, y, steps, lr)
    return {"weights": w, "bias": np.array([b])}


def cohort_data(cohort_dir: str | Path) -> TrainingData:
    """A generated cohort folder as one site's training data, without a spoke: each case
    folder a series, its ``nodule_count`` from ``ground_truth.json``. (Under a spoke the
    cases are de-identified and the labels come from the site's attributes file.)"""
    root = Path(cohort_dir)
    truth = json.loads((root / "ground_truth.json").read_text())
    cases = []
    for folder in sorted(truth):
        digest = hashlib.sha256(f"{root.resolve()}/{folder}".encode()).hexdigest()[:16]
        path = root / folder
        series = Series(f"s-{digest}", "CT", str(path), len(list(path.iterdir())))
        cases.append(TrainingCase(f"c-{digest}", (series,),
                                  {"nodule_count": len(truth[folder]["nodules"])}))
    return TrainingData(tuple(cases))


def pooled(algorithm: NoduleClassifier, sites: Sequence[TrainingData]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of several sites together."""
    parts = [algorithm.dataset(site) for site in sites]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def scores(model: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and log loss of ``model`` on features ``x`` and labels ``y``."""
    w, b = model["weights"], float(model["bias"][0])
    return {"accuracy": accuracy(w, b, x, y), "loss": log_loss(w, b, x, y)}


def central_steps(rounds: int, local_epochs: int = 1) -> int:
    """Gradient steps that give central training the same budget as ``rounds`` federated
    rounds of ``local_epochs`` each."""
    return rounds * local_epochs * STEPS_PER_EPOCH


def compare(site_dirs: Sequence[str | Path], test_dirs: Sequence[str | Path],
            federated: dict[str, np.ndarray], rounds: int, local_epochs: int = 1
            ) -> dict[str, dict[str, float]]:
    """Held-out scores of a federated model (from a hub, or :func:`simulate`) beside the
    same model trained centrally on the pooled data of ``site_dirs`` with the same budget:
    ``{"federated": {...}, "centralised": {...}}``. What a demo reports."""
    algorithm = NoduleClassifier()
    x, y = pooled(algorithm, [cohort_data(d) for d in site_dirs])
    x_test, y_test = pooled(algorithm, [cohort_data(d) for d in test_dirs])
    central = train_central(x, y, central_steps(rounds, local_epochs))
    return {"federated": scores(federated, x_test, y_test),
            "centralised": scores(central, x_test, y_test)}
