"""``tributary demo training``: a federated training study on three spokes, here, on the
production path. A hub process of the demo's own (`tributary hub serve`, whose training
service runs the rounds) and three spoke agent processes (`tributary spoke run` with
``[training]`` on, each with its own key made for this run and enrolled at the hub) talk
only through the machine's broker (signed messages). The training image is pushed to the
machine's registry, registered at the hub with its publisher's release signature and
approved by two reviewers; the study names that version, and each spoke admits it as it
admits a validation study's image (the hub's approval and a trusted release signature),
pulls it by digest and runs it with its own executor on its de-identified catalog of a
synthetic cohort from its own scanner (non-IID). Global models and masked updates go
through a SeaweedFS of the demo's own (each spoke may write only its own objects). The
report compares the federated model with the same model trained centrally on the pooled
data, on a held-out set."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from tributary import services
from tributary.hub.db import make_engine
from tributary.hub.models import TrainingRound
from tributary.hub.services import training
from tributary.protocol.objects import ObjectStore
from tributary.protocol.signing import SigningKey
from tributary.protocol.training.tensors import decode_tensors, encode_tensors
from tributary.services import objectstore
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port
from tributary.testbed.federation import (
    LocalFederation,
    build_and_push,
    examples_dir,
    generate_cohort,
)
from tributary.testbed.training_hub import TrainingHub
from tributary_algorithm.tools.localrun import participant_for_series
from tributary_algorithm.tools.localtrain import SiteCase, TrainingSite

SPOKES = ("site-a", "site-b", "site-c")
BASE_IMAGE = "tributary/python-base:3.11"
#: The demo's store listens on a loopback address of its own.
STORE_HOST = "127.0.0.2"


def load_logreg() -> ModuleType:
    """The example's module (features, central training, held-out scores)."""
    path = examples_dir() / "federated_logreg" / "logreg.py"
    spec = importlib.util.spec_from_file_location("federated_logreg_demo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def site_of(folder: Path) -> TrainingSite:
    truth = json.loads((folder / "ground_truth.json").read_text())
    cases = tuple(
        SiteCase(f"c-{i:016x}", participant_for_series([folder / name], f"c-{i:016x}"),
                 {"nodule_count": len(truth[name]["nodules"])})
        for i, name in enumerate(sorted(truth)))
    return TrainingSite(folder.name, cases)


def make_cohorts(root: Path, cases: int = 8, held_out: int = 4) -> Path:
    for n in range(len(SPOKES)):  # each site its own scanner; the test set mixes all
        generate_cohort(root / f"site{n}", cases, seed=100 + n, site=f"Site {n}", size=64,
                        slices=16, scanner=n)
        generate_cohort(root / f"test{n}", held_out, seed=200 + n, site=f"Site {n}",
                        size=64, slices=16, scanner=n)
    return root


@dataclass
class TrainingDemo:
    """A finished demo study and what it ran on (the e2e test inspects these)."""

    report: dict[str, Any]
    study_id: str
    engine: Engine
    hub: TrainingHub
    hub_store: ObjectStore
    cohorts: Path
    final: dict[str, np.ndarray]
    store_for: Callable[[str], ObjectStore]
    #: The spokes' configs (their work folders hold each spoke's audit log and journal).
    spoke_configs: dict[str, Path] = field(default_factory=dict)

    def global_model_at(self, round_index: int) -> dict[str, np.ndarray]:
        """The global model that went into ``round_index``, from the store by its digest."""
        with Session(self.engine) as session:
            row = session.exec(select(TrainingRound).where(
                TrainingRound.study_id == self.study_id,
                TrainingRound.round_index == round_index)).first()
        if row is None or row.global_model_in is None:
            raise KeyError(f"no round {round_index} in {self.study_id}")
        return model_from_store(self.hub_store, self.study_id, round_index,
                                row.global_model_in)


def model_from_store(store: ObjectStore, study_id: str, round_index: int,
                     digest: str) -> dict[str, np.ndarray]:
    data = store.get(training.model_location(study_id, round_index, digest))
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"the global model of round {round_index} does not match its digest")
    return decode_tensors(data)


def push_training_image(settings: ServiceSettings) -> tuple[str, str]:
    """Build the example image offline and push it to the machine's registry: (repository,
    manifest digest), what the hub registers and the spokes pull by digest."""
    return build_and_push(examples_dir() / "federated_logreg", "federated-logreg", "1",
                          settings)


def start_spokes(federation: LocalFederation, cohorts: Path, store_settings: ServiceSettings,
                 publisher_pem: Path) -> dict[str, Path]:
    """Each spoke as a site runs it (`tributary spoke run`): its own key (made here, for
    this run; enrol it at the hub), the hub's key pinned, the demo publisher trusted, its
    de-identified catalog of its cohort, ``[training]`` on with the store credentials that
    write only its own objects. Started before the hub is up: they boot meanwhile."""
    configs = {}
    for n, spoke in enumerate(SPOKES):
        config = federation.spoke_config(spoke, cohorts / f"site{n}",
                                         publisher_keys=(publisher_pem,))
        creds = objectstore.write_party_credentials(store_settings, spoke)
        # Synthetic sites: their policy releases the local loss, for the curves.
        config.write_text(config.read_text() + (
            f'\n[training]\nenabled = true\nobjectstore_credentials = "{creds}"\n'
            'label_attributes = ["nodule_count"]\ntimeout_seconds = 300\nmemory_mb = 512\n'
            "release_loss = true\n"))
        SigningKey.load_or_create(config.parent / "spoke.key")
        federation.start_spoke(spoke, config)
        configs[spoke] = config
    return configs


def run_training_demo(workdir: Path, service_settings: ServiceSettings,
                      store_settings: ServiceSettings, image: tuple[str, str],
                      rounds: int = 4, clip_bound: float = 10.0,
                      noise_multiplier: float = 0.002, epsilon_budget: float = 1e12,
                      delta: float = 1e-5, say: Callable[[str], None] = print,
                      hub: TrainingHub | None = None,
                      launch: Callable[[dict[str, Any]], str] | None = None) -> TrainingDemo:
    """Run one study to its end, on the production path: a hub process of its own
    (`tributary hub serve`, its training service in the web app) on the running broker and
    the given object store; the training image (``image``: repository and digest, pushed)
    registered and approved there; three spoke agent processes; the spokes enrolled and
    the study launched through the hub's API (or by ``launch``, given the API's body,
    returning the study's id: the dashboard's form in the browser test). ``hub``: one
    already started (left running; the spokes' folders go beside its own)."""
    logreg = load_logreg()
    cohorts = workdir / "cohorts"
    if not (cohorts / "test2").exists():
        make_cohorts(cohorts)
    own_hub = hub is None
    if hub is None:
        hub = TrainingHub(workdir / "federation", service_settings.host,
                          service_settings.broker_port, f"tr{uuid.uuid4().hex[:8]}",
                          objectstore.write_party_credentials(store_settings, "hub"))
    root = hub.folder  # the spokes pin the key the hub made there
    federation = LocalFederation(root, service_settings, federation=hub.federation)
    publisher = SigningKey.load_or_create(root / "publisher.key")
    publisher_pem = root / "publisher.pem"
    publisher_pem.write_text(publisher.public.pem)

    def store_for(party: str) -> ObjectStore:
        return ObjectStore.from_file(objectstore.write_party_credentials(store_settings, party))

    try:
        configs = start_spokes(federation, cohorts, store_settings, publisher_pem)
        if own_hub:
            hub.start()
        with hub.api(hub.admin_token) as api:
            for spoke, config in configs.items():
                hub.enrol(api, spoke, SigningKey.load_or_create(config.parent / "spoke.key"))
            algorithm_id = hub.register_approved(api, "federated-logreg", *image, publisher)
            initial = {"weights": np.zeros(len(logreg.FEATURES)), "bias": np.zeros(1)}
            body = {
                "name": "nodules", "algorithm_id": algorithm_id, "spokes": list(SPOKES),
                "rounds": rounds, "min_participants": len(SPOKES), "round_deadline_s": 120,
                "clip_bound": clip_bound, "noise_multiplier": noise_multiplier,
                "epsilon_budget": epsilon_budget, "delta": delta,
                "initial_model_b64": base64.b64encode(encode_tensors(initial)).decode()}
            if launch is not None:
                study_id = launch(body)
            else:
                launched = api.post("/api/training-studies", json=body)
                if launched.status_code != 201:
                    raise RuntimeError(f"the hub refused the study: {launched.text}")
                study_id = launched.json()["id"]
            say(f"training study {study_id}: {rounds} rounds on {', '.join(SPOKES)} "
                f"(hub at {hub.url})")
            study = hub.wait_for_end(api, study_id, timeout=60.0 * (rounds + 2), poll=0.3)
    finally:
        federation.stop()
        if own_hub:
            hub.stop()
    engine = make_engine(hub.database_url, migrate=False)
    hub_store = store_for("hub")
    with Session(engine) as session:
        rows = session.exec(select(TrainingRound).where(TrainingRound.study_id == study_id)
                            .order_by(TrainingRound.round_index, TrainingRound.attempt)).all()
        done = [r for r in rows if r.stage == "aggregated"]
        final = (model_from_store(hub_store, study_id, done[-1].round_index + 1,
                                  done[-1].global_model_out) if done else initial)
        scores = logreg.compare([cohorts / f"site{n}" for n in range(len(SPOKES))],
                                [cohorts / f"test{n}" for n in range(len(SPOKES))], final,
                                rounds)
        report = {
            "study_id": study_id,
            "state": study["state"],
            "stop_reason": study["stop_reason"],
            "rounds": [{"round": r.round_index, "attempt": r.attempt, "outcome": r.stage,
                        "participants": sorted(r.num_examples),
                        "survivors": sorted(r.secagg.get("masked", {})),
                        "epsilon": r.epsilon_cumulative, "global_model": r.global_model_out}
                       for r in rows],
            "secure_aggregation": True,
            "differential_privacy": {"clip_bound": clip_bound,
                                     "noise_multiplier": noise_multiplier, "delta": delta,
                                     "guarantee": "local, per site"},
            "metric": "held-out accuracy",
            "metric_federated": scores["federated"]["accuracy"],
            "metric_centralised": scores["centralised"]["accuracy"],
            "loss_federated": scores["federated"]["loss"],
            "loss_centralised": scores["centralised"]["loss"],
        }
    for r in report["rounds"]:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.4g}"
        say(f"  round {r['round']}: {r['outcome']}, participants {len(r['participants'])}, "
            f"epsilon {eps}")
    say(f"held-out accuracy: federated {report['metric_federated']:.3f}, "
        f"centralised {report['metric_centralised']:.3f}")
    return TrainingDemo(report, study_id, engine, hub, hub_store, cohorts, final,
                        store_for, configs)


def main(workdir: Path | None, report: Path | None, wait: bool, rounds: int,
         say: Callable[[str], None] = print) -> dict[str, Any]:
    """The command: services up, its own object store, the image, the study, the report."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="tributary-training-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    settings = ServiceSettings()
    services.up(settings)
    store_settings = ServiceSettings(state_dir=workdir / "objectstore", host=STORE_HOST,
                                     objectstore_port=free_port(STORE_HOST))
    objectstore.write_identities(store_settings, list(SPOKES), federation="training-demo")
    objectstore.ensure_running(store_settings)
    try:
        say("building the training image (offline, from wheels) and pushing it...")
        image = push_training_image(settings)
        demo = run_training_demo(workdir, settings, store_settings, image, rounds=rounds,
                                 say=say)
        if report is not None:
            report.write_text(json.dumps(demo.report, indent=2))
            say(f"report written to {report}")
        if wait:
            say("the study has ended; press Ctrl-C to stop the demo's object store")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return demo.report
    finally:
        objectstore.stop(store_settings)
