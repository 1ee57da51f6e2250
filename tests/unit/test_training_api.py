"""The training-studies API: only coordinators launch; a launch naming a spoke that is not
registered, revoked or without an active key is refused with each reason and creates
nothing; the initial model is read as hostile input; the study's JSON carries each round's
joined spokes, survivors, dropouts, ε and mean loss (what the dashboard and the CLI read).
Real hub app (TestClient), SQLite, the machine's broker."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from approved_algorithms import approved_algorithm
from fastapi.testclient import TestClient
from safetensors.numpy import save
from signed_results import Spokes
from sqlmodel import Session, select

from tributary.hub import worker
from tributary.hub.main import create_app
from tributary.hub.models import AuditEvent, Spoke, TrainingRound, TrainingStudy, utcnow
from tributary.hub.services import training
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings
from tributary.protocol.training.privacy import epsilon_after

PASSWORD = "a long enough password"
SPOKES = ["north", "south", "east"]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-train")
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        tokens: dict[str, str] = {}
        with Session(engine) as session:
            for role in ("coordinator", "developer"):
                create_user(session, f"user-{role}", PASSWORD, [role])  # type: ignore[list-item]
                tokens[role], _ = issue_token(session, f"user-{role}", PASSWORD)  # type: ignore[misc]
            Spokes(session, SPOKES)
            revoked = session.get(Spoke, "east")
            revoked.revoked_at = utcnow()
            session.add(revoked)
            session.add(Spoke(id="keyless", name="keyless"))
            approved_algorithm(session, name="approved")
            approved_algorithm(session, name="unreviewed", approved=False)
            revoked_version = approved_algorithm(session, name="withdrawn")
            revoked_version.revoked_at, revoked_version.revoked_reason = utcnow(), "leaks"
            session.add(revoked_version)
            session.commit()
        yield client, tokens
    worker.configure(HubSettings())


def body(spokes: list[str], model: bytes | None = None, **override: object) -> dict:
    model = model if model is not None else save({"w": np.zeros(3)})
    return {"name": "t", "algorithm_id": 1, "spokes": spokes, "rounds": 2,
            "clip_bound": 1.0, "noise_multiplier": 1.0, "epsilon_budget": 10.0,
            "delta": 1e-5, "initial_model_b64": base64.b64encode(model).decode(), **override}


def post(client: TestClient, token: str, json: dict) -> tuple[int, object]:
    response = client.post("/api/training-studies", json=json,
                           headers={"Authorization": f"Bearer {token}"})
    return response.status_code, response.json()


def count(client: TestClient) -> int:
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        return len(session.exec(select(TrainingStudy)).all())


def test_launch_refusals(hub: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = hub
    assert post(client, tokens["developer"], body(["north", "south"]))[0] == 403
    status, detail = post(client, tokens["coordinator"],
                          body(["north", "east", "keyless", "nowhere"]))
    assert status == 422
    assert detail["detail"]["refusals"] == [
        {"spoke_id": "east", "reason": detail["detail"]["refusals"][0]["reason"]},
        {"spoke_id": "keyless", "reason": "no active enrolled key"},
        {"spoke_id": "nowhere", "reason": "not registered"}]
    assert detail["detail"]["refusals"][0]["reason"].startswith("revoked at ")
    nan = save({"w": np.array([0.0, np.nan])})
    status, detail = post(client, tokens["coordinator"], body(["north", "south"], nan))
    assert status == 422 and "safetensors" in detail["detail"]
    status, _ = post(client, tokens["coordinator"],
                     {**body(["north", "south"]), "initial_model_b64": "not base64!"})
    assert status == 422
    status, _ = post(client, tokens["coordinator"], body(["north", "south"], strategy="sgd"))
    assert status == 422
    status, detail = post(client, tokens["coordinator"],
                          body(["north", "south"], strategy="fedadam", beta_2=1.5))
    assert status == 422 and detail["detail"][0]["loc"] == ["body", "beta_2"]
    status, detail = post(client, tokens["coordinator"],
                          body(["north", "south"], server_lr=0.5))  # FedAvg has no server_lr
    assert status == 422 and "fedadam, fedyogi, fedadagrad only" in str(detail)
    # Everything valid, but this hub has no object store: refused, nothing created.
    status, detail = post(client, tokens["coordinator"], body(["north", "south"]))
    assert status == 503 and "object store" in detail["detail"]
    assert count(client) == 0


def test_launch_names_an_approved_version(hub: tuple[TestClient, dict[str, str]]) -> None:
    """An unknown, unreviewed or revoked version is refused with the reason (409, audited)
    and nothing is created; the approved one is checked before the object store is needed
    (this hub has none: 503)."""
    client, tokens = hub
    expected = {999: "no algorithm version 999 is registered",
                2: "unreviewed 1 is not approved", 3: "withdrawn 1 is revoked: leaks"}
    for algorithm_id, reason in expected.items():
        status, detail = post(client, tokens["coordinator"],
                              body(["north", "south"], algorithm_id=algorithm_id))
        assert (status, detail["detail"]) == (409, f"cannot launch: {reason}")
    assert post(client, tokens["coordinator"], body(["north", "south"]))[0] == 503
    assert count(client) == 0
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        refused = session.exec(select(AuditEvent).where(
            AuditEvent.action == "training.launch_refused")).all()
        assert [(e.actor, e.detail["algorithm_id"], e.detail["reason"]) for e in refused] == [
            ("user-coordinator", i, r) for i, r in expected.items()]
        study = training.launch(session, training.StudySpec(
            name="t", algorithm_id=1, spokes=["north", "south"], rounds=1, clip_bound=1.0,
            noise_multiplier=1.0, epsilon_budget=10.0, delta=1e-5,
            initial_model="sha256:" + "1" * 64), "user-coordinator")
        assert (study.algorithm, study.algorithm_id) == (
            "registry.local/logreg@sha256:" + "a" * 64, 1)


def test_study_json_carries_rounds_survivors_dropouts_and_epsilon(
        hub: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = hub
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        study = training.launch(session, training.StudySpec(
            name="t", algorithm_id=1, spokes=[*SPOKES[:2], "west"], rounds=3,
            clip_bound=1.0, noise_multiplier=1.0, epsilon_budget=10.0, delta=1e-5,
            initial_model="sha256:" + "1" * 64, strategy="fedyogi", server_lr=0.05),
            "user-coordinator")
        session.flush()
        now = utcnow()
        done = TrainingRound(
            study_id=study.id, round_index=0, attempt=1, round_id=f"{study.id}-r0-a1",
            stage="aggregated", stage_deadline=now + timedelta(minutes=1),
            participants=["north", "south", "west"],
            secagg={"stage": "unmask", "survivors": ["north"], "masked": {"north": {}}},
            num_examples={"north": 10, "south": 30}, losses={"north": 0.5, "south": 0.25},
            uploads={}, global_model_in="sha256:" + "1" * 64,
            global_model_out="sha256:" + "2" * 64, epsilon_cumulative=1.5, mean_loss=0.3125)
        open_ = TrainingRound(
            study_id=study.id, round_index=1, attempt=1, round_id=f"{study.id}-r1-a1",
            stage="keys", stage_deadline=now + timedelta(minutes=1),
            participants=["north", "south", "west"], secagg={"stage": "keys"},
            num_examples={}, uploads={}, global_model_in="sha256:" + "2" * 64)
        session.add(done)
        session.add(open_)
        study.ledgers = {"north": {"delta": 1e-5, "charges": [{"noise_multiplier": 1.0}]}}
        session.add(study)
        session.commit()
        study_id = study.id
    headers = {"Authorization": f"Bearer {tokens['developer']}"}  # reading: any user
    listed = client.get("/api/training-studies", headers=headers).json()
    assert [(s["id"], s["state"], s["rounds_done"]) for s in listed] == [
        (study_id, "running", 1)]
    shown = client.get(f"/api/training-studies/{study_id}", headers=headers).json()
    assert (shown["strategy"], shown["server_optimiser"]) == ("fedyogi", {
        "kind": "fedyogi", "server_lr": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9})
    one = epsilon_after(1, 1.0, 1e-5)
    assert shown["epsilon_spent"] == pytest.approx(one)
    first, second = shown["round_list"]
    assert (first["joined"], first["survivors"], first["dropouts"]) == (
        {"north": 10, "south": 30}, ["north"], ["south"])
    assert first["epsilon_round"] == pytest.approx(one)
    assert (first["epsilon_cumulative"], first["mean_loss"]) == (1.5, 0.3125)
    assert (second["stage"], second["joined"], second["dropouts"],
            second["epsilon_round"]) == ("keys", {}, [], None)
    assert client.get("/api/training-studies/ts-none", headers=headers).status_code == 404
    assert client.get("/api/training-studies").status_code == 401
