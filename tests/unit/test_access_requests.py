"""Data access requests and the committee, on a real hub app (its database, its forensic
log, the federation's broker): a refused request launches nothing, an approved one only
within its conditions; the requester never decides their own request; attachments are
checked by content and served only to the requester, the committee and administrators;
two training launches cannot both spend the last of a request's ε budget."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from approved_algorithms import approved_algorithm as add_version
from fastapi.testclient import TestClient
from safetensors.numpy import save
from sqlmodel import Session, select

from tributary.hub.main import create_app
from tributary.hub.models import AccessRequest, AuditEvent, TrainingStudy, utcnow
from tributary.hub.services import access_grants
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings
from tributary.protocol.cohorts.access import StudyKind
from tributary.protocol.signing import SigningKey
from tributary.services.settings import ServiceSettings

PASSWORD = "a long enough password"
DIGEST = "sha256:" + "2" * 64
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


@pytest.fixture
def hub(tmp_path: Path, service_settings: ServiceSettings
        ) -> Iterator[tuple[TestClient, Session]]:
    settings = HubSettings.for_directory(
        tmp_path, signing_key=tmp_path / "hub.key", consume_results=False,
        broker_host=service_settings.host, broker_port=service_settings.broker_port,
        broker_federation=f"t-access-{uuid.uuid4().hex[:6]}", publish_attestations=False,
        verify_registry=False, run_training=False, launch_trust_check="off",
        require_access_requests=True)
    with TestClient(create_app(settings)) as client, \
            Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        session.info["hub_key"] = tmp_path / "hub.key"
        create_user(session, "root", PASSWORD, ["admin"])
        client.headers["Authorization"] = f"Bearer {bearer(session, 'root')}"
        for name, roles in (("carol", ["coordinator"]), ("cora", ["coordinator"]),
                            ("dana", ["committee"]), ("dirk", ["committee"]),
                            ("both", ["coordinator", "committee"])):
            assert client.post("/api/users", json={"username": name, "password": PASSWORD,
                                                   "roles": roles}).status_code == 201
        for spoke in ("north", "south"):
            client.post("/api/spokes", json={"id": spoke, "name": spoke}).raise_for_status()
            client.post(f"/api/spokes/{spoke}/keys", json={
                "public_key_pem": SigningKey.generate().public.pem}).raise_for_status()
        yield client, session


def bearer(session: Session, username: str) -> str:
    issued = issue_token(session, username, PASSWORD)
    assert issued is not None
    return issued[0]


def as_(session: Session, username: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {bearer(session, username)}"}


def approved_algorithm(session: Session) -> int:
    """A version as the review rule leaves it, approved by the hub's key."""
    algorithm = add_version(session, name=f"alg-{uuid.uuid4().hex[:6]}",
                            repository="127.0.0.1:5000/alg", digest=DIGEST,
                            hub_key=SigningKey.load(session.info["hub_key"]))
    session.commit()
    assert algorithm.id is not None
    return algorithm.id


def file_request(client: TestClient, session: Session, who: str = "carol",
                 spokes: tuple[str, ...] = ("north", "south"),
                 attributes: str = "nodules,age", kinds: tuple[str, ...] = ("validation",),
                 ethics: bytes = PDF, **extra: str) -> object:
    return client.post("/api/access-requests", headers=as_(session, who), data={
        "title": "Nodule detector validation", "purpose": "Validate on held-out sites.",
        "spokes": list(spokes), "attributes": attributes, "study_kinds": list(kinds),
        "k": "5", **extra},
        files={"ethics": ("ethics.pdf", ethics, "application/pdf"),
               "dpia": ("dpia.pdf", PDF, "application/pdf")})


def decide(client: TestClient, session: Session, request_id: str, who: str = "dana",
           **body: object) -> object:
    return client.post(f"/api/access-requests/{request_id}/decision",
                       headers=as_(session, who), json=body)


def experiment(client: TestClient, session: Session, algorithm_id: int,
               request_id: str | None, spokes: list[str], release: list[str],
               who: str = "carol") -> dict:
    created = client.post("/api/experiments", headers=as_(session, who), json={
        "name": "bound", "algorithm_id": algorithm_id, "spoke_ids": spokes,
        "release": release, "access_request_id": request_id})
    assert created.status_code == 201, created.text
    return created.json()


def launch(client: TestClient, session: Session, experiment_id: str, who: str = "carol"
           ) -> object:
    return client.post(f"/api/experiments/{experiment_id}/launch", headers=as_(session, who))


def test_a_refused_request_launches_nothing(hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    aid = approved_algorithm(session)
    filed = file_request(client, session)
    assert filed.status_code == 201, filed.text
    request_id = filed.json()["id"]
    refused = decide(client, session, request_id, decision="refuse",
                     reason="no DPIA sign-off by the sites' DPOs")
    assert refused.status_code == 200 and refused.json()["state"] == "refused"

    bound = experiment(client, session, aid, request_id, ["north"], ["nodules"])
    response = launch(client, session, bound["id"])
    assert response.status_code == 409
    assert response.json()["detail"]["condition"] == "state"
    assert "refused: no DPIA sign-off" in response.json()["detail"]["message"]
    unbound = experiment(client, session, aid, None, ["north"], [])
    response = launch(client, session, unbound["id"])
    assert response.status_code == 409
    assert response.json()["detail"]["condition"] == "access_request"
    for e in (bound, unbound):
        read = client.get(f"/api/experiments/{e['id']}").json()
        assert read["state"] == "draft" and read["targets"][0]["state"] == "pending"
    actions = {(e.action, e.target) for e in session.exec(select(AuditEvent))}
    assert ("access.requested", request_id) in actions
    assert ("access.refused", request_id) in actions
    assert ("experiment.launch_refused", bound["id"]) in actions
    assert ("experiment.launch_refused", unbound["id"]) in actions
    # A refused request cannot be approved afterwards.
    assert decide(client, session, request_id, who="dirk", decision="approve"
                  ).status_code == 409


def test_an_approved_request_launches_only_within_its_conditions(
        hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    aid = approved_algorithm(session)
    request_id = file_request(client, session).json()["id"]
    approved = decide(client, session, request_id, decision="approve", spokes=["north"],
                      attributes=["nodules"], min_k=5)
    assert approved.status_code == 200, approved.text
    assert approved.json()["state"] == "approved"
    assert approved.json()["conditions"]["attributes"] == ["nodules"]

    # An attribute outside the conditions, released or selected on: refused, named.
    outside = experiment(client, session, aid, request_id, ["north"], ["nodules", "age"])
    response = launch(client, session, outside["id"])
    assert response.status_code == 409
    assert response.json()["detail"]["condition"] == "attributes"
    assert "age" in response.json()["detail"]["message"]
    # A spoke the committee left out (it was requested).
    south = experiment(client, session, aid, request_id, ["south"], ["nodules"])
    response = launch(client, session, south["id"])
    assert response.status_code == 409 and response.json()["detail"]["condition"] == "spokes"
    # Another coordinator cannot launch under carol's request.
    other = experiment(client, session, aid, request_id, ["north"], ["nodules"], who="cora")
    response = launch(client, session, other["id"], who="cora")
    assert response.status_code == 409
    assert response.json()["detail"]["condition"] == "requester"
    # Inside every condition: launched (its message is on the spoke's queue).
    inside = experiment(client, session, aid, request_id, ["north"], ["nodules"])
    response = launch(client, session, inside["id"])
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "launched"
    assert response.json()["access_request_id"] == request_id
    read = client.get(f"/api/access-requests/{request_id}", headers=as_(session, "carol"))
    assert inside["id"] in read.json()["experiments"]

    # k below the committee's minimum: the hub's own threshold (5) is below 10.
    strict = file_request(client, session).json()["id"]
    decide(client, session, strict, decision="approve", spokes=["north"],
           attributes=["nodules"], min_k=10).raise_for_status()
    low = experiment(client, session, aid, strict, ["north"], ["nodules"])
    response = launch(client, session, low["id"])
    assert response.status_code == 409 and response.json()["detail"]["condition"] == "min_k"
    # Expired: refused, naming the expiry.
    lapsed = file_request(client, session).json()["id"]
    decide(client, session, lapsed, decision="approve",
           expires_at=(utcnow() + timedelta(seconds=2)).isoformat()).raise_for_status()
    time.sleep(2.5)
    late = experiment(client, session, aid, lapsed, ["north"], ["nodules"])
    response = launch(client, session, late["id"])
    assert response.status_code == 409
    assert response.json()["detail"]["condition"] == "expires_at"
    # Withdrawn by the requester: nothing more launches under it.
    client.post(f"/api/access-requests/{request_id}/withdraw", headers=as_(session, "carol"),
                json={"reason": "study closed"}).raise_for_status()
    again = experiment(client, session, aid, request_id, ["north"], ["nodules"])
    response = launch(client, session, again["id"])
    assert response.status_code == 409 and "withdrawn" in response.json()["detail"]["message"]


def test_the_committee_grants_no_more_than_asked_and_never_decides_its_own(
        hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    own = file_request(client, session, who="both").json()["id"]
    response = decide(client, session, own, who="both", decision="approve")
    assert response.status_code == 403 and "own request" in response.json()["detail"]
    response = decide(client, session, own, who="root", decision="approve")
    assert response.status_code == 403 and "administrators" in response.json()["detail"]
    response = decide(client, session, own, who="carol", decision="approve")
    assert response.status_code == 403  # not a committee member
    response = decide(client, session, own, decision="approve", attributes=["nodules", "sex"])
    assert response.status_code == 409 and "attribute sex" in response.json()["detail"]
    response = decide(client, session, own, decision="refuse")
    assert response.status_code == 409 and "says why" in response.json()["detail"]
    assert decide(client, session, own, decision="approve").status_code == 200
    assert decide(client, session, own, decision="approve").status_code == 409  # decided
    events = session.exec(select(AuditEvent).where(AuditEvent.target == own)).all()
    assert [e.action for e in events].count("access.refused_action") == 2  # both, root


def test_a_quorum_of_members_must_approve_the_same_conditions(
        tmp_path: Path, hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    client.app.state.settings.access_committee_quorum = 2  # type: ignore[attr-defined]
    request_id = file_request(client, session).json()["id"]
    first = decide(client, session, request_id, decision="approve", attributes=["nodules"])
    assert first.json()["state"] == "submitted"
    second = decide(client, session, request_id, who="dirk", decision="approve")
    assert second.json()["state"] == "submitted"  # other conditions: no quorum on either
    third = file_request(client, session).json()["id"]
    until = (utcnow() + timedelta(days=30)).isoformat()
    decide(client, session, third, decision="approve", expires_at=until).raise_for_status()
    done = decide(client, session, third, who="dirk", decision="approve", expires_at=until)
    assert done.json()["state"] == "approved"
    assert {v["member"] for v in done.json()["votes"]} == {"dana", "dirk"}


def test_attachments_are_checked_by_content_and_shown_only_to_those_entitled(
        hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    disguised = file_request(client, session, ethics=b"%PDF-1.4 but really a script")
    assert disguised.status_code == 422 and "not a PDF" in disguised.json()["detail"]
    html = file_request(client, session, ethics=b"<html><script>alert(1)</script></html>")
    assert html.status_code == 422
    limit = client.app.state.settings.access_attachment_max_bytes  # type: ignore[attr-defined]
    big = file_request(client, session, ethics=PDF[:-7] + b"0" * limit + b"\n%%EOF\n")
    assert big.status_code == 413
    assert not session.exec(select(AccessRequest)).all()  # nothing kept of any of them

    filed = file_request(client, session).json()
    url = f"/api/access-requests/{filed['id']}/attachments/ethics"
    for who in ("carol", "dana", "root"):
        got = client.get(url, headers=as_(session, who))
        assert got.status_code == 200 and got.content == PDF
        assert got.headers["content-disposition"].startswith("attachment;")
        assert got.headers["x-attachment-digest"] == filed["attachments"][1]["digest"]
    for who in ("cora",):
        assert client.get(url, headers=as_(session, who)).status_code == 403
        assert client.get(f"/api/access-requests/{filed['id']}",
                          headers=as_(session, who)).status_code == 403
    listed = client.get("/api/access-requests", headers=as_(session, "cora")).json()
    assert listed == []
    reads = session.exec(select(AuditEvent).where(
        AuditEvent.action == "access.attachment_read")).all()
    assert sorted(e.actor for e in reads) == ["carol", "dana", "root"]


def test_two_launches_cannot_both_spend_the_last_of_the_budget(
        hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    filed = file_request(client, session, kinds=("training",), epsilon="1.0").json()
    decide(client, session, filed["id"], decision="approve").raise_for_status()
    engine = client.app.state.engine  # type: ignore[attr-defined]
    ask = access_grants.LaunchAsk(kind=StudyKind.TRAINING, spokes=["north", "south"], k=5,
                                  epsilon=0.6)
    checked, outcomes = threading.Barrier(2), []

    def one(hold: float) -> None:
        with Session(engine) as own:
            try:
                request = access_grants.check(own, filed["id"], "carol", ask, True)
                assert request is not None
                checked.wait()  # both saw 1.0 left
                time.sleep(0.0 if hold else 0.1)  # the other spends while one holds
                access_grants.spend(own, request, ask.epsilon)
                time.sleep(hold)  # holds its spend uncommitted while the other tries
                own.commit()
                outcomes.append("spent")
            except access_grants.AccessRefused as exc:
                outcomes.append(exc.condition)

    threads = [threading.Thread(target=one, args=(hold,)) for hold in (0.5, 0.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["epsilon_budget", "spent"]
    session.expire_all()
    assert session.get(AccessRequest, filed["id"]).epsilon_spent == pytest.approx(0.6)
    # And what is left is refused before anything is spent.
    with pytest.raises(access_grants.AccessRefused) as refused:
        access_grants.check(session, filed["id"], "carol", ask, True)
    assert refused.value.condition == "epsilon_budget"


def test_training_launches_are_held_to_the_request_and_its_budget(
        hub: tuple[TestClient, Session]) -> None:
    """Through the training API: unbound, a spoke outside, ε beyond what is left: refused
    (409, named, audited, nothing spent); inside the conditions the launch goes on to the
    object store, which this hub lacks (503): the spend rolls back with the study."""
    client, session = hub
    aid = approved_algorithm(session)
    filed = file_request(client, session, spokes=("north",), kinds=("training",),
                         epsilon="3.0").json()
    decide(client, session, filed["id"], decision="approve").raise_for_status()
    model = base64.b64encode(save({"w": np.zeros(3)})).decode()

    def study(**override: object) -> object:
        return client.post("/api/training-studies", headers=as_(session, "carol"), json={
            "name": "bound", "algorithm_id": aid, "spokes": ["north", "south"], "rounds": 2,
            "min_participants": 2, "clip_bound": 1.0, "noise_multiplier": 1.0,
            "epsilon_budget": 2.0, "delta": 1e-5, "initial_model_b64": model,
            "access_request_id": filed["id"], **override})

    response = study(access_request_id=None)
    assert response.status_code == 409
    assert response.json()["detail"]["condition"] == "access_request"
    response = study()
    assert response.status_code == 409 and response.json()["detail"]["condition"] == "spokes"
    # k of a training study: the fewest spokes whose sum is revealed (min_participants).
    wide = file_request(client, session, kinds=("training",), epsilon="3.0").json()
    decide(client, session, wide["id"], decision="approve", min_k=2).raise_for_status()
    strict = file_request(client, session, kinds=("training",), epsilon="3.0").json()
    decide(client, session, strict["id"], decision="approve", min_k=3).raise_for_status()
    response = study(access_request_id=strict["id"], min_participants=2)
    assert response.status_code == 409 and response.json()["detail"]["condition"] == "min_k"
    response = study(access_request_id=wide["id"], min_participants=2, epsilon_budget=3.5)
    assert response.status_code == 409
    assert response.json()["detail"]["condition"] == "epsilon_budget"
    inside = study(access_request_id=wide["id"], min_participants=2, epsilon_budget=2.0)
    assert inside.status_code == 503 and "object store" in inside.json()["detail"]
    session.expire_all()
    assert session.get(AccessRequest, wide["id"]).epsilon_spent == 0.0
    assert not session.exec(select(TrainingStudy)).all()
    refused = session.exec(select(AuditEvent).where(
        AuditEvent.action == "training.launch_refused")).all()
    assert {e.detail["condition"] for e in refused} == {"access_request", "spokes", "min_k",
                                                        "epsilon_budget"}


def test_linkage_and_vertical_studies_run_only_under_a_request_that_allows_them(
        hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    carol = as_(session, "carol")
    psi = {"mode": "cardinality", "spoke_ids": ["north", "south"], "purpose": "feasibility"}
    vertical = {"name": "split", "psi_id": "psi-1", "features_spoke": "north",
                "label_spoke": "south", "features_attributes": ["nodules"],
                "label_attributes": ["age"], "label": "outcome", "positive": 1}
    # Unbound, where the hub asks for requests: refused.
    for path, body in (("/api/psi", psi), ("/api/vertical-studies", vertical)):
        response = client.post(path, headers=carol, json=body)
        assert response.status_code == 409, response.text
        assert response.json()["detail"]["condition"] == "access_request"
    # A request for validation only allows neither.
    validation = file_request(client, session).json()["id"]
    decide(client, session, validation, decision="approve").raise_for_status()
    for path, body in (("/api/psi", psi), ("/api/vertical-studies", vertical)):
        response = client.post(path, headers=carol,
                               json={**body, "access_request_id": validation})
        assert response.status_code == 409 and response.json()["detail"][
            "condition"] == "study_kinds", response.text
    # One for linkage and vertical training, with "outcome" left out by the committee.
    cohort = file_request(client, session, attributes="nodules,age,stage,outcome",
                          kinds=("linkage", "vertical")).json()["id"]
    decide(client, session, cohort, decision="approve",
           attributes=["nodules", "age", "stage"]).raise_for_status()
    linked = client.post("/api/psi", headers=carol, json={**psi, "access_request_id": cohort})
    assert linked.status_code == 201, linked.text
    outside = client.post("/api/vertical-studies", headers=carol,
                          json={**vertical, "access_request_id": cohort})
    assert outside.status_code == 409
    assert outside.json()["detail"]["condition"] == "attributes"
    assert "outcome" in outside.json()["detail"]["message"]
    inside = client.post("/api/vertical-studies", headers=carol, json={
        **vertical, "label": "stage", "access_request_id": cohort})
    assert inside.status_code == 201, inside.text
    read = client.get(f"/api/access-requests/{cohort}", headers=carol).json()
    assert read["psi_runs"] == [linked.json()["id"]]
    assert read["vertical_studies"] == [inside.json()["id"]]
    refused = {e.action for e in session.exec(select(AuditEvent))}
    assert {"psi.launch_refused", "vertical.launch_refused"} <= refused
    # The vertical study's bundle carries its request's decision (and the linked PSI's
    # record when the hub holds that PSI); the PSI's bundle carries its request too.
    archive = zipfile.ZipFile(io.BytesIO(client.get(
        f"/api/vertical-studies/{inside.json()['id']}/bundle", headers=carol).content))
    access = json.loads(archive.read("access-request.json"))
    assert access["id"] == cohort and access["state"] == "approved" and access["audit_events"]
    assert "linked-psi.json" not in archive.namelist()  # psi-1 is not a PSI of this hub
    linked_id = linked.json()["id"]
    bound = client.post("/api/vertical-studies", headers=carol, json={
        **vertical, "name": "linked", "psi_id": linked_id, "label": "stage",
        "access_request_id": cohort}).json()
    archive = zipfile.ZipFile(io.BytesIO(client.get(
        f"/api/vertical-studies/{bound['id']}/bundle", headers=carol).content))
    assert json.loads(archive.read("linked-psi.json"))["psi"]["id"] == linked_id
    psi_bundle = zipfile.ZipFile(io.BytesIO(client.get(
        f"/api/psi/{linked_id}/bundle", headers=carol).content))
    assert cohort.encode() in b"".join(psi_bundle.read(n) for n in psi_bundle.namelist())
