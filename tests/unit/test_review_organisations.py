"""The review rule counts people of distinct organisations, and one administrator cannot
satisfy it alone: organisations are records (names normalised and unique, referred to by
id), administrators never count as reviewers, and the registrant's organisation cannot
review its own version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from tributary.hub.main import create_app
from tributary.hub.models import Algorithm
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings

PASSWORD = "a long enough password"
DIGEST = "sha256:" + "1" * 64


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[TestClient, Session]]:
    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-orgs",
                                         publish_attestations=False, verify_registry=False)
    with TestClient(create_app(settings)) as client, \
            Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        create_user(session, "root", PASSWORD, ["admin"])
        client.headers["Authorization"] = f"Bearer {token(session, 'root')}"
        yield client, session


def token(session: Session, username: str) -> str:
    issued = issue_token(session, username, PASSWORD)
    assert issued is not None
    return issued[0]


def add_user(client: TestClient, username: str, roles: list[str], **organisation: object
             ) -> dict:
    response = client.post("/api/users", json={"username": username, "password": PASSWORD,
                                               "roles": roles, **organisation})
    assert response.status_code == 201, response.text
    return response.json()


def review(client: TestClient, session: Session, username: str, algorithm_id: int
           ) -> tuple[int, dict]:
    response = client.post(f"/api/algorithms/{algorithm_id}/reviews",
                           json={"decision": "approve"},
                           headers={"Authorization": f"Bearer {token(session, username)}"})
    return response.status_code, response.json()


def register(session: Session, registrant: str) -> int:
    algorithm = Algorithm(name=f"alg-{registrant}", version="1", repository="r/alg",
                          digest=DIGEST, registered_by=registrant)
    session.add(algorithm)
    session.commit()
    assert algorithm.id is not None
    return algorithm.id


def test_one_administrator_cannot_make_two_organisations_from_one_name(
        hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    north = add_user(client, "alice", ["reviewer"], organisation="North")
    twin = add_user(client, "bob", ["reviewer"], organisation="north ")
    aid = register(session, "root")
    assert review(client, session, "alice", aid)[1]["approval"] is None
    status, body = review(client, session, "bob", aid)
    assert status == 200 and body["approval"] is None  # two people, one organisation
    assert north["organisation_id"] == twin["organisation_id"]  # one record, by identity
    assert twin["organisation"] == "North"
    spaced = client.post("/api/organisations", json={"name": "  NORTH  "})
    assert spaced.status_code == 409


def test_administrators_never_count_as_reviewers(hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    south = client.post("/api/organisations", json={"name": "South"})
    assert south.status_code == 201, south.text
    add_user(client, "alice", ["reviewer"], organisation="North")
    add_user(client, "sam", ["admin", "reviewer"], organisation_id=south.json()["id"])
    aid = register(session, "root")
    review(client, session, "alice", aid)
    status, body = review(client, session, "sam", aid)
    assert status == 409 and "administrator" in body["detail"]
    add_user(client, "sue", ["reviewer"], organisation_id=south.json()["id"])
    status, body = review(client, session, "sue", aid)
    assert status == 200 and body["approval"] is not None


def test_the_registrants_organisation_cannot_review_its_version(
        hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    add_user(client, "dev", ["developer"], organisation="East")
    add_user(client, "eve", ["reviewer"], organisation="EAST")
    add_user(client, "alice", ["reviewer"], organisation="North")
    aid = register(session, "dev")
    status, body = review(client, session, "eve", aid)
    assert status == 409 and "organisation" in body["detail"]
    assert review(client, session, "alice", aid)[1]["approval"] is None


def test_users_refer_to_organisations_that_exist(hub: tuple[TestClient, Session]) -> None:
    client, _ = hub
    missing = client.post("/api/users", json={"username": "zed", "password": PASSWORD,
                                              "roles": ["reviewer"], "organisation_id": 999})
    assert missing.status_code == 422
    listed = client.get("/api/organisations")
    assert listed.status_code == 200 and listed.json() == []
