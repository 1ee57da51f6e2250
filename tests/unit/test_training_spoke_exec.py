"""The spoke agent's training settings and what it reads back from a training run: the
``[training]`` table (off by default, credentials required when on, paths relative to the
file), and a run's output.json and parameters read as hostile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tributary.protocol.training.tensors import write_tensors
from tributary.spoke.config import SpokeConfig
from tributary.spoke.training import TrainingRefused
from tributary.spoke.training_exec import read_result

GLOBAL = {"weights": np.zeros(3), "bias": np.zeros(1)}


def config(tmp_path: Path, training: str) -> Path:
    path = tmp_path / "spoke.toml"
    path.write_text('spoke_id = "north"\ndata_dir = "data"\nwork_dir = "work"\n'
                    f'hub_public_key = "hub.pub"\n{training}')
    return path


def test_training_is_off_unless_enabled_with_credentials(tmp_path: Path) -> None:
    assert SpokeConfig.load(config(tmp_path, "")).training.enabled is False
    loaded = SpokeConfig.load(config(tmp_path, (
        '[training]\nenabled = true\nobjectstore_credentials = "os/credentials.json"\n'
        'max_epsilon_per_study = 4.0\nlabel_attributes = ["nodule_count"]\n'))).training
    assert loaded.objectstore_credentials == (tmp_path / "os" / "credentials.json").resolve()
    assert loaded.max_epsilon_per_study == 4.0 and loaded.label_attributes == ["nodule_count"]
    for bad in ("[training]\nenabled = true\n",
                '[training]\nenabled = true\nobjectstore_credentials = "c"\n'
                "max_epsilon_per_study = 0\n",
                "[training]\nepsilon = 3\n"):
        with pytest.raises(ValidationError):
            SpokeConfig.load(config(tmp_path, bad))


def run_output(tmp_path: Path, output: object, params: dict | None) -> Path:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "output.json").write_text(output if isinstance(output, str) else json.dumps(output))
    if params is not None:
        write_tensors(out / "parameters.safetensors", params)
    return out


FIT = {"training_contract_version": "1.0", "task": "fit", "num_examples": 5, "loss": 0.5}


def test_a_good_run_is_read_back(tmp_path: Path) -> None:
    new = {"weights": np.ones(3), "bias": np.full(1, 2.0)}
    result = read_result(run_output(tmp_path, FIT, new), GLOBAL)
    assert result.num_examples == 5 and result.loss == 0.5
    assert np.array_equal(result.parameters["weights"], np.ones(3))


@pytest.mark.parametrize(("output", "params", "words"), [
    ({**FIT, "task": "evaluate"}, GLOBAL, "task"),
    ({**FIT, "num_examples": -1}, GLOBAL, "num_examples"),
    ({**FIT, "metrics": {"note": "the patient is"}}, GLOBAL, "metrics"),
    ("[1, 2]", GLOBAL, "JSON object"),
    ("x" * 100_000, GLOBAL, "the limit is 65536"),
    (FIT, None, "parameters"),
    (FIT, {"weights": np.zeros(4), "bias": np.zeros(1)}, "the model's is float64[3]"),
    (FIT, {**GLOBAL, "extra": np.zeros(1)}, "extra"),
])
def test_hostile_outputs_are_refused(tmp_path: Path, output: object, params: dict | None,
                                     words: str) -> None:
    with pytest.raises(TrainingRefused) as refused:
        read_result(run_output(tmp_path, output, params), GLOBAL)
    assert refused.value.reason == "training_failed"
    assert words in str(refused.value), str(refused.value)
