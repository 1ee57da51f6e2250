"""Vertical training across two spoke agents over the real broker and object store: an
imaging spoke (radiomics-like attributes of its catalog) and a clinical spoke (clinical
attributes and the label) hold different columns of one PSI's linked cohort; the hub's
coordinator runs the rounds, relaying Paillier ciphertexts and masked values between them.

The run: the clinical site's steward approves the study (nothing is read before), the
imaging spoke and then the hub are stopped mid-study and started again from their work
folder and database, and the model both spokes end with matches the same gradient descent
on the pooled data; the coordinator gets no coefficient (the study did not release them),
only the losses. Refusals: a study naming an attribute outside a site's allowlist, one
naming a PSI a site has no linking table for and one its steward rejects are each refused
with the reason at the hub; a reply signed by a key the hub does not trust changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from sqlmodel import Session, col, select

from tributary.hub.db import make_engine
from tributary.hub.models import AuditEvent, VerticalStudy
from tributary.hub.services import vertical
from tributary.hub.vertical_coordinator import VerticalCoordinator
from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.cohorts import vertical as vmsg
from tributary.protocol.cohorts import vertical_lr as lr
from tributary.protocol.objects import ObjectStore
from tributary.protocol.signing import SigningKey
from tributary.protocol.training.transport import seal_message
from tributary.services import objectstore
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port
from tributary.spoke.linkage import Linkage
from tributary.spoke.vertical import VerticalAgent
from tributary.spoke.vertical_desk import VerticalDesk

pytestmark = pytest.mark.e2e
T = TypeVar("T")
IMAGING, CLINICAL = "imaging-site", "clinical-site"
IMAGING_ATTRS = ["nodule_volume", "mean_hu", "sphericity"]
CLINICAL_ATTRS = ["age", "pack_years"]
ROUNDS, RATE, L2 = 6, 0.5, 0.01
#: Largest |vertical - central| of a coefficient (fixed-point rounding, 2^-24 a value).
TOLERANCE = 1e-5
N = 40
BIN = Path(sys.executable).parent


def wait_for(probe: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.2)
    return value


@pytest.fixture(scope="module")
def store_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceSettings]:
    settings = ServiceSettings(state_dir=tmp_path_factory.mktemp("os"), host="127.0.0.2",
                               objectstore_port=free_port("127.0.0.2"))
    objectstore.write_identities(settings, [IMAGING, CLINICAL], federation="vertical-e2e")
    assert objectstore.ensure_running(settings) in ("started", "running")
    yield settings
    objectstore.stop(settings)


def cohort(seed: int = 5) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]],
                                   dict[str, str], dict[str, str]]:
    """Each site's attributes by its own case ids and its linking table (the same
    pseudonyms at both sites, different case ids), plus cases the other site lacks."""
    rng = np.random.default_rng(seed)
    imaging = rng.normal(size=(N, 3)) * [800.0, 60.0, 0.1] + [2000.0, -400.0, 0.7]
    clinical = rng.normal(size=(N, 2)) * [9.0, 15.0] + [64.0, 30.0]
    score = ((imaging - imaging.mean(0)) / imaging.std(0)) @ [1.0, 0.6, -0.8] \
        + ((clinical - clinical.mean(0)) / clinical.std(0)) @ [0.5, 0.9]
    malignant = rng.random(N) < 1 / (1 + np.exp(-score))
    pseudonyms = [uuid.uuid4().hex for _ in range(N)]
    img_attrs, cli_attrs, img_links, cli_links = {}, {}, {}, {}
    for i, p in enumerate(pseudonyms):
        img_links[p], cli_links[p] = f"IMG{i:04d}", f"CLI{(i * 7) % N:04d}"
        img_attrs[f"IMG{i:04d}"] = dict(zip(IMAGING_ATTRS, map(float, imaging[i]),
                                            strict=True)) | {"scanner": "ct-x"}
        cli_attrs[f"CLI{(i * 7) % N:04d}"] = dict(
            zip(CLINICAL_ATTRS, map(float, clinical[i]), strict=True)) | {
            "diagnosis": "malignant" if malignant[i] else "benign", "postcode": "AB1"}
    img_attrs["IMG9999"] = dict.fromkeys(IMAGING_ATTRS, 1.0)  # not linked: never read
    return img_attrs, cli_attrs, img_links, cli_links


class Federation:
    def __init__(self, root: Path, service: ServiceSettings, store: ServiceSettings) -> None:
        self.root, self.service, self.store = root, service, store
        self.federation = f"vt{uuid.uuid4().hex[:8]}"
        self.broker = BrokerSettings(host=service.host, port=service.broker_port,
                                     federation=self.federation)
        self.hub_key = SigningKey.generate()
        self.keys = {s: SigningKey.generate() for s in (IMAGING, CLINICAL)}
        self.engine = make_engine(f"sqlite:///{root / 'hub.db'}")
        self.clients: list[StompClient] = []
        self.agents: dict[str, VerticalAgent] = {}
        self.hub: VerticalCoordinator | None = None
        self.img_attrs, self.cli_attrs, img_links, cli_links = cohort()
        self.features = {IMAGING: self.img_attrs, CLINICAL: self.cli_attrs}
        self.allowed = {IMAGING: IMAGING_ATTRS, CLINICAL: [*CLINICAL_ATTRS, "diagnosis"]}
        for spoke, links in ((IMAGING, img_links), (CLINICAL, cli_links)):
            with Linkage(root / spoke) as linkage:
                linkage.save("psi-1", links)

    def client(self, name: str) -> StompClient:
        client = StompClient(self.broker, name).start(wait=30)
        self.clients.append(client)
        return client

    def start_spoke(self, spoke: str) -> VerticalAgent:
        store = ObjectStore.from_file(objectstore.write_party_credentials(self.store, spoke))
        agent = VerticalAgent(
            spoke, self.client(f"{spoke}-{uuid.uuid4().hex[:4]}"), store, self.keys[spoke],
            self.hub_key.public, self.federation, self.root / spoke, b"j" * 32,
            self.allowed[spoke], lambda: self.features[spoke], poll_s=0.2)
        self.agents[spoke] = agent.start()
        return agent

    def stop_spoke(self, spoke: str) -> None:
        agent = self.agents.pop(spoke)
        agent.broker.close()
        agent.stop()

    def start_hub(self) -> VerticalCoordinator:
        store = ObjectStore.from_file(objectstore.write_party_credentials(self.store, "hub"))
        self.hub = VerticalCoordinator(
            self.engine, self.client(f"hub-{uuid.uuid4().hex[:4]}"), store, self.hub_key,
            {s: k.public for s, k in self.keys.items()}, self.federation, resend_s=5.0)
        return self.hub.serve(poll_s=0.2)

    def stop_hub(self) -> None:
        assert self.hub is not None
        self.hub.broker.close()
        self.hub.stop()
        self.hub = None

    def create(self, **overrides: Any) -> str:
        settings: dict[str, Any] = {
            "name": "nodules", "psi_id": "psi-1", "features_spoke": IMAGING,
            "label_spoke": CLINICAL, "features_attributes": IMAGING_ATTRS,
            "label_attributes": CLINICAL_ATTRS, "label": "diagnosis", "positive": "malignant",
            "hyperparameters": vmsg.Hyperparameters(rounds=ROUNDS, learning_rate=RATE, l2=L2,
                                                    key_bits=1024),
            "release_coefficients": False, "created_by": "coordinator@hub"} | overrides
        with Session(self.engine) as session:
            study = vertical.create(session, **settings)
            session.commit()
            return study.id

    def study(self, study_id: str) -> VerticalStudy:
        with Session(self.engine) as session:
            study = session.get(VerticalStudy, study_id)
            assert study is not None
            return study

    def steward(self, spoke: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``tributary spoke vertical ...`` with the spoke's configuration."""
        config = self.root / f"{spoke}.toml"
        if not config.exists():
            (self.root / "hub.pem").write_text(self.hub_key.public.pem)
            (self.root / "data").mkdir(exist_ok=True)
            config.write_text(f'spoke_id = "{spoke}"\ndata_dir = "data"\n'
                              f'work_dir = "{spoke}"\nhub_public_key = "hub.pem"\n')
        return subprocess.run([str(BIN / "tributary"), "spoke", "vertical", *args,
                               "--config", str(config)], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "COLUMNS": "200"})

    def actions(self, study_id: str) -> list[str]:
        with Session(self.engine) as session:
            return [e.action for e in session.exec(select(AuditEvent).where(
                AuditEvent.target == study_id).order_by(col(AuditEvent.id)))]

    def close(self) -> None:
        if self.hub is not None:
            self.stop_hub()
        for spoke in list(self.agents):
            self.stop_spoke(spoke)
        for client in self.clients:
            client.close()


@pytest.fixture
def fed(tmp_path: Path, service_settings: ServiceSettings,
        store_settings: ServiceSettings) -> Iterator[Federation]:
    federation = Federation(tmp_path, service_settings, store_settings)
    yield federation
    federation.close()


def central_reference(fed: Federation, rounds: int = ROUNDS
                      ) -> tuple[np.ndarray, np.ndarray, list[float]]:
    with Linkage(fed.root / IMAGING) as a, Linkage(fed.root / CLINICAL) as b:
        rows_a, rows_b = a.cases("psi-1"), b.cases("psi-1")
    assert [p for p, _ in rows_a] == [p for p, _ in rows_b]
    x_a = np.array([[fed.img_attrs[c][n] for n in IMAGING_ATTRS] for _, c in rows_a])
    x_b = np.array([[fed.cli_attrs[c][n] for n in CLINICAL_ATTRS] for _, c in rows_b])
    y = np.array([1.0 if fed.cli_attrs[c]["diagnosis"] == "malignant" else -1.0
                  for _, c in rows_b])
    z_a, z_b = lr.standardise(x_a)[0], lr.standardise(x_b)[0]
    return lr.central(z_a, np.hstack([z_b, np.ones((N, 1))]), y, rounds, RATE, L2)


def test_vertical_study_across_two_spokes_with_restarts(fed: Federation) -> None:
    for spoke in (IMAGING, CLINICAL):
        fed.start_spoke(spoke)
    fed.start_hub()
    study_id = fed.create()

    # Each site holds the study for its steward: nothing runs, no key is made.
    wait_for(lambda: all(fed.study(study_id).parties.get(s, {}).get("state") == "held"
                         for s in (IMAGING, CLINICAL)), 60, "both sites to hold the study")
    assert fed.study(study_id).state == "inviting"
    fed.agents[IMAGING].desk.decide(study_id, True, "steward@imaging")
    wait_for(lambda: fed.study(study_id).parties[IMAGING]["state"] == "accepted", 60,
             "the imaging site to accept")
    time.sleep(1.0)
    assert fed.study(study_id).state == "inviting"  # the clinical steward has not decided
    desk = fed.agents[CLINICAL].desk
    assert desk.load(study_id) is None
    listed = fed.steward(CLINICAL, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(s["study_id"], s["state"], s["role"], s["label"]) for s in json.loads(
        listed.stdout)] == [(study_id, "pending", "label", "diagnosis")]
    approved = fed.steward(CLINICAL, "approve", study_id, "--as", "steward@clinical")
    assert approved.returncode == 0, approved.stderr
    wait_for(lambda: fed.study(study_id).state == "running", 60, "the study to start")

    # The imaging spoke stops mid-study and starts again from its work folder.
    wait_for(lambda: fed.study(study_id).round_index >= 1, 240, "round 1")
    fed.stop_spoke(IMAGING)
    time.sleep(1.0)
    fed.start_spoke(IMAGING)
    # Then the hub: a new coordinator on the same database.
    wait_for(lambda: fed.study(study_id).round_index >= 3, 240, "round 3")
    fed.stop_hub()
    time.sleep(1.0)
    fed.start_hub()
    wait_for(lambda: (s := fed.study(study_id)).state == "completed" and len(s.final) == 2,
             300, "the study to complete")

    study = fed.study(study_id)
    w_a, w_b, losses = central_reference(fed)
    imaging_state = fed.agents[IMAGING].desk.load(study_id)
    clinical_state = fed.agents[CLINICAL].desk.load(study_id)
    assert imaging_state is not None and clinical_state is not None
    # Each round counted exactly once: the spokes' weights are the central ones.
    assert np.max(np.abs(np.asarray(imaging_state.party.weights) - w_a)) < TOLERANCE
    assert np.max(np.abs(np.asarray(clinical_state.party.weights) - w_b)) < TOLERANCE
    assert len(study.losses) == ROUNDS
    assert np.allclose(study.losses, losses, atol=TOLERANCE)
    # The coordinator learns no coefficient (not released); the spokes forgot their keys.
    assert vertical.model(study)["parties"] == {IMAGING: None, CLINICAL: None}
    assert imaging_state.party.p_hex == "0" and clinical_state.party.p_hex == "0"
    actions = fed.actions(study_id)
    assert actions.count("vertical.round_closed") == ROUNDS
    assert "vertical.relayed" in actions and "vertical.completed" in actions

    # A reply signed by a key the hub does not trust changes nothing.
    assert fed.hub is not None
    forged = vmsg.Reply(study_id=study_id, round_index=0, stage="share")
    fed.hub.broker.publish(vmsg.hub_vertical_queue(fed.federation),
                           seal_message(SigningKey.generate(), forged))
    wait_for(lambda: any("not signed by a trusted party" in r for r in fed.hub.refused),
             30, "the forged reply to be refused")
    assert fed.study(study_id).losses == study.losses


def test_refusals_reach_the_hub_with_their_reason(fed: Federation) -> None:
    for spoke in (IMAGING, CLINICAL):
        fed.start_spoke(spoke)
    fed.start_hub()
    # A step signed by a key that is not the hub's is refused by the spoke, unanswered.
    forged = vmsg.Step(study_id="s-forged", spoke_id=CLINICAL, round_index=0, stage="share")
    fed.hub.broker.publish(vmsg.spoke_vertical_queue(CLINICAL, fed.federation),  # type: ignore[union-attr]
                           seal_message(SigningKey.generate(), forged))
    wait_for(lambda: any("not signed by a trusted party" in r
                         for r in fed.agents[CLINICAL].refused), 30, "the forged step refused")
    outside = fed.create(label_attributes=["age", "postcode"])
    unknown = fed.create(psi_id="psi-unknown")
    rejected = fed.create()

    wait_for(lambda: fed.study(outside).state == "refused", 60, "an allowlist refusal")
    assert "postcode" in (fed.study(outside).reason or "") \
        and CLINICAL in (fed.study(outside).reason or "")
    wait_for(lambda: fed.study(unknown).state == "refused", 60, "a PSI refusal")
    assert "no linking table for PSI psi-unknown" in (fed.study(unknown).reason or "")

    wait_for(lambda: fed.study(rejected).parties.get(CLINICAL, {}).get("state") == "held",
             60, "the steward's hold")
    done = fed.steward(CLINICAL, "reject", rejected, "--reason", "not our remit")
    assert done.returncode == 0, done.stderr
    again = fed.steward(CLINICAL, "approve", rejected)
    assert again.returncode == 1 and "no pending vertical study" in again.stdout
    wait_for(lambda: fed.study(rejected).state == "refused", 60, "the steward's rejection")
    assert "not our remit" in (fed.study(rejected).reason or "")
    # Nothing of any refused study was computed: no sealed state at the clinical site.
    for study_id in (outside, unknown, rejected):
        assert fed.agents[CLINICAL].desk.load(study_id) is None
        assert "vertical.refused" in fed.actions(study_id)
    # The imaging site, still holding the studies for its steward, was told they ended.
    for study_id in (outside, rejected):
        wait_for(lambda s=study_id: IMAGING in fed.study(s).final, 60, "the imaging final")
        held = fed.agents[IMAGING].desk.get(study_id)
        assert held is not None and held.state == "finished"


def test_desk_state_is_sealed(tmp_path: Path) -> None:
    """The party state at rest is ciphertext: another key cannot open it."""
    desk = VerticalDesk(tmp_path / "v.sqlite", b"a" * 32)
    invite = vmsg.Invite(study_id="s1", spoke_id="site-a", psi_id="p", role="features",
                         attributes=["x"], peer="site-b")
    desk.hold(invite)
    from tributary.spoke.vertical_desk import StudyState
    party, _ = lr.new_party("features", ["x"], np.arange(30.0).reshape(-1, 1), 1024)
    desk.set_state("s1", "accepted", study=StudyState(party=party, columns=[[1.0]] * 30))
    desk.close()
    assert party.p_hex.encode() not in (tmp_path / "v.sqlite").read_bytes()
    with pytest.raises(ValueError, match="authentication"):
        VerticalDesk(tmp_path / "v.sqlite", b"b" * 32).load("s1")


def test_released_coefficients_give_the_central_model(fed: Federation) -> None:
    """With ``release_coefficients`` the coordinator gets each spoke's coefficients on the
    original scale of its attributes: together they are the central model's predictions."""
    for spoke in (IMAGING, CLINICAL):
        fed.start_spoke(spoke)
    fed.start_hub()
    study_id = fed.create(release_coefficients=True)
    for spoke in (IMAGING, CLINICAL):
        wait_for(lambda s=spoke: fed.study(study_id).parties.get(s, {}).get("state")
                 == "held", 60, "the hold")
        fed.agents[spoke].desk.decide(study_id, True, f"steward@{spoke}")
    wait_for(lambda: (s := fed.study(study_id)).state == "completed" and len(s.final) == 2,
             300, "the study to complete")
    model = vertical.model(fed.study(study_id))
    assert model["released"] and model["intercept"] is not None
    coef = {c["name"]: c["value"] for p in model["parties"].values() for c in p}
    assert set(coef) == {*IMAGING_ATTRS, *CLINICAL_ATTRS}
    w_a, w_b, _ = central_reference(fed)
    with Linkage(fed.root / IMAGING) as a, Linkage(fed.root / CLINICAL) as b:
        rows = list(zip(a.cases("psi-1"), b.cases("psi-1"), strict=True))
    x_a = np.array([[fed.img_attrs[c][n] for n in IMAGING_ATTRS] for (_, c), _ in rows])
    x_b = np.array([[fed.cli_attrs[c][n] for n in CLINICAL_ATTRS] for _, (_, c) in rows])
    released = x_a @ [coef[n] for n in IMAGING_ATTRS] + x_b @ [coef[n] for n in CLINICAL_ATTRS] \
        + model["intercept"]
    z_a, z_b = lr.standardise(x_a)[0], lr.standardise(x_b)[0]
    central = z_a @ w_a + z_b @ w_b[:-1] + w_b[-1]
    assert np.max(np.abs(released - central)) < 1e-4


def study_state(federation: Any, study_id: str) -> str:
    """The study's state read from the hub's database directly (its process is down)."""
    engine = make_engine(f"sqlite:///{federation.hub_dir / 'hub.db'}", migrate=False)
    try:
        with Session(engine) as session:
            row = session.get(VerticalStudy, study_id)
            assert row is not None
            return row.state
    finally:
        engine.dispose()


def test_spoke_run_and_hub_processes(tmp_path: Path, service_settings: ServiceSettings,
                                     store_settings: ServiceSettings) -> None:
    """The production path: a hub process (``tributary hub serve``, its vertical coordinator
    trusting the spokes' keys enrolled through its API) and two ``tributary spoke run``
    processes (``[training] vertical_attributes``), their columns read from the attributes
    file each site supplies (radiomics features at the imaging site, clinical attributes and
    the diagnosis at the clinical one, keyed by the site's own patient IDs; no images here).
    The study is created with ``tributary vertical create``, each steward approves with
    ``tributary spoke vertical approve``; the hub and the imaging spoke are killed (SIGKILL)
    mid-study and started again, and the losses are still the central model's."""
    from tributary.spoke.config import SpokeConfig
    from tributary.spoke.pseudonyms import Pseudonymizer
    from tributary.testbed.federation import LocalFederation

    hub_creds = objectstore.write_party_credentials(store_settings, "hub")
    federation = LocalFederation(tmp_path / "fed", service_settings, hub_env={
        "TRIBUTARY_HUB_OBJECTSTORE_CREDENTIALS": str(hub_creds),
        "TRIBUTARY_HUB_TRAINING_POLL_SECONDS": "0.2"})
    img_attrs, cli_attrs, img_links, cli_links = cohort(seed=11)
    sites = {IMAGING: (img_attrs, img_links, IMAGING_ATTRS),
             CLINICAL: (cli_attrs, cli_links, [*CLINICAL_ATTRS, "diagnosis"])}
    configs: dict[str, Path] = {}

    def tributary(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "tributary"), *args], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "COLUMNS": "200"})

    try:
        federation.start_hub()
        hub_args = ["--hub", federation.hub_url, "--token", federation.admin_token]
        for spoke, (attrs, _, allowed) in sites.items():
            data = tmp_path / "data" / spoke
            data.mkdir(parents=True)
            names = sorted({n for values in attrs.values() for n in values})
            lines = ["patient_id," + ",".join(names)] + [
                f"{case}," + ",".join(str(values.get(n, "")) for n in names)
                for case, values in attrs.items()]
            (data / "attributes.csv").write_text("\n".join(lines) + "\n")
            config = federation.add_spoke(spoke, data)  # registered, its key enrolled
            creds = objectstore.write_party_credentials(store_settings, spoke)
            config.write_text(config.read_text() + (
                f'\n[training]\nenabled = true\nobjectstore_credentials = "{creds}"\n'
                f"vertical_attributes = {json.dumps(allowed)}\n"))
            configs[spoke] = config
            ingest = tributary("spoke", "ingest", "--config", str(config))
            assert ingest.returncode == 0, ingest.stderr + ingest.stdout
            federation.start_spoke(spoke, config)
        # Each site's linking table: the PSI's pseudonyms to its own case pseudonyms (what
        # the PSI leaves at the site; here written directly, as the PSI would).
        for spoke, (_, links, _) in sites.items():
            work = SpokeConfig.load(configs[spoke]).work_dir
            pseudonyms = Pseudonymizer.from_key_file(work / "pseudonym.key")
            with Linkage(work) as linkage:
                linkage.save("psi-1", {p: pseudonyms.case_id(f"patient:{c}")
                                       for p, c in links.items()})
        settings = tmp_path / "study.json"
        settings.write_text(json.dumps({
            "name": "processes", "psi_id": "psi-1", "features_spoke": IMAGING,
            "label_spoke": CLINICAL, "features_attributes": IMAGING_ATTRS,
            "label_attributes": CLINICAL_ATTRS, "label": "diagnosis", "positive": "malignant",
            "rounds": ROUNDS, "learning_rate": RATE, "l2": L2, "key_bits": 1024}))
        created = tributary("vertical", "create", "--file", str(settings), *hub_args)
        assert created.returncode == 0, created.stderr
        study_id = created.stdout.strip()

        def study() -> dict[str, Any]:
            shown = tributary("vertical", "show", study_id, *hub_args)
            assert shown.returncode == 0, shown.stderr
            return json.loads(shown.stdout)

        for spoke, config in configs.items():
            wait_for(lambda s=spoke: study()["parties"].get(s, {}).get("state") == "held", 120,
                     f"{spoke} to hold the study")
            done = tributary("spoke", "vertical", "approve", study_id, "--config", str(config))
            assert done.returncode == 0, done.stderr
        # SIGKILL the hub and the imaging spoke mid-study; both start again.
        def at_round() -> int:
            with federation.api() as api:
                return int(api.get(f"/api/vertical-studies/{study_id}").json()["round_index"])

        wait_for(lambda: at_round() >= 1, 240, "round 1")
        for name in ("hub", f"spoke-{IMAGING}"):
            federation.processes[name].popen.kill()
            federation.processes[name].popen.wait()
        assert study_state(federation, study_id) == "running"
        federation.start_hub()
        hub_args[-1] = federation.admin_token
        federation.start_spoke(IMAGING, configs[IMAGING])
        try:
            wait_for(lambda: study()["state"] == "completed", 300, "the study to complete")
        except TimeoutError:
            raise AssertionError(federation.processes["hub"].log_tail() + "".join(
                federation.processes[f"spoke-{s}"].log_tail() for s in configs)) from None
        final = study()
        ref = Federation.__new__(Federation)  # the reference model on the same rows
        ref.root, ref.img_attrs, ref.cli_attrs = tmp_path / "ref", img_attrs, cli_attrs
        for spoke, links in ((IMAGING, img_links), (CLINICAL, cli_links)):
            with Linkage(ref.root / spoke) as linkage:
                linkage.save("psi-1", links)
        _, _, losses = central_reference(ref)
        assert len(final["losses"]) == ROUNDS  # each round counted once
        assert np.allclose(final["losses"], losses, atol=TOLERANCE)
        model = wait_for(lambda: (m := json.loads(tributary(
            "vertical", "model", study_id, *hub_args).stdout))["intercept"] is None and all(
            s in json.dumps(m) for s in configs) and m, 60, "the model")
        assert model["parties"] == {IMAGING: None, CLINICAL: None}  # not released
        listed = tributary("vertical", "list", *hub_args)
        assert listed.returncode == 0 and study_id in listed.stdout
        log = (configs[CLINICAL].parent / "audit.jsonl").read_text()
        assert '"vertical.accepted"' in log and '"vertical.answered"' in log
        hub_log = federation.hub_audit_log.read_text()
        assert '"vertical.round_closed"' in hub_log and '"vertical.completed"' in hub_log
    finally:
        federation.stop()
