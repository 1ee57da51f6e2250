"""`tributary training list|show|watch` against a real hub process: `watch` exits 0 for a
study that finished its rounds and 1, with the reason, for one stopped at its privacy budget
or failed; `show --json` is the API's JSON; a hub without an object store refuses a launch
with the reason and the CLI says it on one line; `launch --init-from-algorithm` runs the
approved version's own init task (pulled by digest, in the sandbox) for the initial model."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from approved_algorithms import approved_algorithm
from safetensors.numpy import save_file
from sqlmodel import Session

from tributary.cli.training_init import initial_model
from tributary.hub.db import make_engine
from tributary.hub.models import TrainingRound, utcnow
from tributary.hub.services import training
from tributary.protocol.signing import SigningKey
from tributary.protocol.training.tensors import decode_tensors
from tributary.services.settings import ServiceSettings
from tributary.testbed.training_demo import load_logreg, push_training_image
from tributary.testbed.training_hub import TRIBUTARY, TrainingHub

pytestmark = pytest.mark.e2e


def cli(hub: TrainingHub, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRIBUTARY, "training", *args, "--hub", hub.url, "--token", token],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})


def add_study(database_url: str, state: str, reason: str, rounds_done: int) -> str:
    engine = make_engine(database_url)
    with Session(engine) as session:
        algorithm_id = approved_algorithm(session, name=f"{state}-logreg").id
        study = training.launch(session, training.StudySpec(
            name=f"{state} study", algorithm_id=algorithm_id, spokes=["north", "south"],
            rounds=max(rounds_done, 2), clip_bound=1.0, noise_multiplier=1.0, epsilon_budget=5.0,
            delta=1e-5, initial_model="sha256:" + "1" * 64), "coordinator")
        session.flush()
        for i in range(rounds_done):
            session.add(TrainingRound(
                study_id=study.id, round_index=i, attempt=1, round_id=f"{study.id}-r{i}-a1",
                stage="aggregated", stage_deadline=utcnow() + timedelta(minutes=1),
                participants=["north", "south"],
                secagg={"stage": "unmask", "survivors": ["north", "south"]},
                num_examples={"north": 5, "south": 7}, uploads={},
                global_model_in="sha256:" + "1" * 64, global_model_out="sha256:" + "2" * 64,
                epsilon_cumulative=1.0 + i, mean_loss=0.5))
        study.state, study.stop_reason = state, reason
        session.add(study)
        session.commit()
        study_id = study.id
    engine.dispose()
    return study_id


def test_watch_exit_status_show_and_list(service_settings: ServiceSettings,
                                          tmp_path: Path) -> None:
    hub = TrainingHub(tmp_path / "hub", service_settings.host, service_settings.broker_port,
                      f"tc{uuid.uuid4().hex[:8]}", store_credentials=None)
    finished = add_study(hub.database_url, "finished", "2 rounds done", 2)
    stopped = add_study(hub.database_url, "stopped_budget",
                        "round 1 would spend epsilon 7.1 > budget 5.0", 1)
    failed = add_study(hub.database_url, "failed", "round 0 failed 3 attempts", 0)
    hub.start()
    try:
        token = hub.sign_in()
        done = cli(hub, token, "watch", finished, "--interval", "0.2")
        assert done.returncode == 0, done.stderr
        assert "round 1 attempt 1: aggregated, survivors 2/2, ε 2" in done.stdout
        assert f"{finished}: finished" in done.stdout
        over = cli(hub, token, "watch", stopped, "--interval", "0.2")
        assert over.returncode == 1
        assert "stopped_budget (round 1 would spend epsilon 7.1 > budget 5.0)" in over.stdout
        assert cli(hub, token, "watch", failed, "--interval", "0.2").returncode == 1
        missing = cli(hub, token, "watch", "ts-nowhere")
        assert missing.returncode == 1 and "404" in missing.stderr

        shown = json.loads(cli(hub, token, "show", finished, "--json").stdout)
        assert [(r["round"], r["survivors"], r["epsilon_cumulative"])
                for r in shown["round_list"]] == [(0, ["north", "south"], 1.0),
                                                  (1, ["north", "south"], 2.0)]
        table = cli(hub, token, "show", stopped).stdout
        assert "stopped_budget" in table and "north, south" in table
        listed = cli(hub, token, "list").stdout
        assert all(s in listed for s in (finished, stopped, failed))

        model = tmp_path / "initial.safetensors"
        save_file({"w": np.zeros(2)}, str(model))
        with hub.api(token) as api:
            for spoke in ("north", "south"):
                hub.enrol(api, spoke, SigningKey.generate())
        settings = ("--initial-model", str(model), "--name", "x", "--spoke", "north",
                    "--spoke", "south", "--rounds", "1", "--clip-bound", "1",
                    "--noise-multiplier", "1", "--epsilon-budget", "5", "--delta", "1e-5")
        unknown = cli(hub, token, "launch", *settings, "--algorithm", "999")
        assert unknown.returncode == 1
        assert "409" in unknown.stderr and "no algorithm version 999" in unknown.stderr
        refused = cli(hub, token, "launch", *settings, "--algorithm", "1")
        assert refused.returncode == 1
        assert "503" in refused.stderr and "no object store" in refused.stderr
        assert "Traceback" not in refused.stderr

        # The version's own initialisation: its init task, pulled by digest, in the sandbox.
        repository, digest = push_training_image(service_settings)
        with hub.api(token) as api:
            version = hub.register_approved(api, "federated-logreg", repository, digest,
                                            SigningKey.generate())
        no_model = settings[2:]
        both = cli(hub, token, "launch", *settings, "--init-from-algorithm",
                   "--algorithm", str(version))
        assert both.returncode == 2 and "either --initial-model or --init-from-algorithm" \
            in both.stderr
        missing = cli(hub, token, "launch", *no_model, "--init-from-algorithm",
                      "--algorithm", "999")
        assert missing.returncode == 1
        assert "no algorithm version 999 is registered" in missing.stderr
        features = len(load_logreg().FEATURES)
        init = cli(hub, token, "launch", *no_model, "--init-from-algorithm",
                   "--algorithm", str(version))
        assert f"federated-logreg 1's init: {features + 1} parameters" in init.stdout, init
        assert init.returncode == 1 and "no object store" in init.stderr  # then the hub's
        data, count = initial_model(f"{repository}@{digest}")
        params = decode_tensors(data)
        assert count == features + 1 and set(params) == {"weights", "bias"}
        assert not params["weights"].any() and params["weights"].shape == (features,)
    finally:
        hub.stop()
