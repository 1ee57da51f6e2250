"""Registering a version is checked against what its publisher signed (issue 15): a release
statement for another name or version is refused, a digest already registered as another
version is named (accepted: a re-label, but never silently); the dashboard's algorithm
pages show versions, signatures and reviews, and the forms to register a publisher and to
review."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from tributary.hub.main import create_app
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings
from tributary.protocol.release import sign_release
from tributary.protocol.signing import SigningKey

PASSWORD = "a long enough password"
REPO = "127.0.0.1:5000/algorithms/demo"
DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "b" * 64


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-publish",
                                         publish_attestations=False, verify_registry=False)
    with TestClient(create_app(settings)) as client, \
            Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        tokens = {}
        for name, roles, organisation in (("root", ["admin"], ""),
                                          ("dev", ["developer"], "Demo Lab"),
                                          ("rev", ["reviewer"], "Review Board")):
            create_user(session, name, PASSWORD, roles, organisation)  # type: ignore[arg-type]
            tokens[name] = issue_token(session, name, PASSWORD)[0]  # type: ignore[index]
        yield client, tokens


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def publisher(hub: tuple[TestClient, dict[str, str]]) -> SigningKey:
    client, tokens = hub
    key = SigningKey.generate()
    response = client.post("/api/publishers", headers=auth(tokens["root"]),
                           json={"name": "Demo Lab", "public_key_pem": key.public.pem})
    assert response.status_code == 201, response.text
    return key


def register(client: TestClient, token: str, name: str, version: str, digest: str,
             signature: dict | None) -> tuple[int, dict]:
    response = client.post("/api/algorithms", headers=auth(token), json={
        "name": name, "version": version, "repository": REPO, "digest": digest,
        "release_signature": signature, "argument_schema": {"type": "object"}})
    return response.status_code, response.json()


def test_release_statement_for_another_version_or_name_is_refused(
        hub: tuple[TestClient, dict[str, str]], publisher: SigningKey) -> None:
    client, tokens = hub
    signed_for_1 = sign_release(publisher, REPO, DIGEST, "demo", "1.0.0", "Demo Lab")
    status, body = register(client, tokens["dev"], "demo", "2.0.0", DIGEST, signed_for_1)
    assert status == 422
    assert "names demo 1.0.0, not demo 2.0.0" in body["detail"]
    status, body = register(client, tokens["dev"], "other", "1.0.0", DIGEST, signed_for_1)
    assert status == 422 and "names demo 1.0.0, not other 1.0.0" in body["detail"]
    audit = client.get("/api/audit", headers=auth(tokens["root"]),
                       params={"action": "algorithm.refused"}).json()
    assert any("not demo 2.0.0" in entry["detail"]["reason"] for entry in audit)
    status, body = register(client, tokens["dev"], "demo", "1.0.0", DIGEST, signed_for_1)
    assert status == 201, body
    assert body["publisher"] == "Demo Lab"


def test_same_digest_as_another_version_is_named(
        hub: tuple[TestClient, dict[str, str]], publisher: SigningKey) -> None:
    client, tokens = hub
    first = register(client, tokens["dev"], "demo", "1.0.0", DIGEST,
                     sign_release(publisher, REPO, DIGEST, "demo", "1.0.0", "Demo Lab"))
    assert first[0] == 201
    response = client.post("/api/algorithms", headers=auth(tokens["dev"]), json={
        "name": "demo", "version": "1.0.1", "repository": REPO, "digest": DIGEST,
        "release_signature": sign_release(publisher, REPO, DIGEST, "demo", "1.0.1",
                                          "Demo Lab")})
    assert response.status_code == 201
    assert response.headers["X-Tributary-Notice"] == (
        f"the image {DIGEST} is already registered as demo 1.0.0 (id {first[1]['id']}): "
        "this version runs exactly the same code")
    audit = client.get("/api/audit", headers=auth(tokens["root"]),
                       params={"action": "algorithm.registered"}).json()
    assert [e["detail"].get("same_image_as") for e in audit if e["target"] == "demo 1.0.1"] \
        == [f"demo 1.0.0 (id {first[1]['id']})"]
    fresh = client.post("/api/algorithms", headers=auth(tokens["dev"]), json={
        "name": "demo", "version": "1.0.2", "repository": REPO, "digest": OTHER_DIGEST})
    assert fresh.status_code == 201 and "X-Tributary-Notice" not in fresh.headers
    page = client.get(f"/algorithms/{response.json()['id']}", headers=auth(tokens["dev"]))
    assert "same image as 1.0.0" in page.text


def test_algorithm_pages_show_versions_signatures_reviews_and_forms(
        hub: tuple[TestClient, dict[str, str]], publisher: SigningKey) -> None:
    client, tokens = hub
    _, v1 = register(client, tokens["dev"], "demo", "1.0.0", DIGEST,
                     sign_release(publisher, REPO, DIGEST, "demo", "1.0.0", "Demo Lab"))
    _, v2 = register(client, tokens["dev"], "demo", "1.1.0", OTHER_DIGEST, None)
    reviewed = client.post(f"/api/algorithms/{v1['id']}/reviews", headers=auth(tokens["rev"]),
                           json={"decision": "approve", "comment": "read the code"})
    assert reviewed.status_code == 200, reviewed.text

    page = client.get(f"/algorithms/{v1['id']}", headers=auth(tokens["rev"]))
    assert page.status_code == 200
    html = page.text
    assert "Demo Lab" in html and publisher.keyid in html  # the release signature's key
    assert '"version": "1.0.0"' in html or "&#34;version&#34;: &#34;1.0.0&#34;" in html
    assert "read the code" in html and "rev" in html  # the review
    assert f'href="/algorithms/{v2["id"]}"' in html  # the other version
    # this reviewer has reviewed; a second reviewer would still see the form on 1.1.0
    other = client.get(f"/algorithms/{v2['id']}", headers=auth(tokens["rev"])).text
    assert f'data-api="/api/algorithms/{v2["id"]}/reviews"' in other
    assert client.get("/algorithms/999", headers=auth(tokens["rev"])).status_code == 404

    listing = client.get("/algorithms", headers=auth(tokens["root"])).text
    assert 'data-api="/api/publishers"' in listing and publisher.keyid in listing
    assert f'href="/algorithms/{v1["id"]}"' in listing
    as_reviewer = client.get("/algorithms", headers=auth(tokens["rev"])).text
    assert 'data-api="/api/publishers"' not in as_reviewer  # administrators only
    assert "tributary publisher register" in as_reviewer


def test_a_notice_about_an_unusual_name_is_still_a_valid_header(
        hub: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = hub
    name = "тест\r\nX-Injected: 1"
    assert register(client, tokens["dev"], name, "1", DIGEST, None)[0] == 201
    response = client.post("/api/algorithms", headers=auth(tokens["dev"]), json={
        "name": name, "version": "2", "repository": REPO, "digest": DIGEST})
    assert response.status_code == 201
    assert "X-Injected" not in response.headers
    assert "already registered as ????" in response.headers["X-Tributary-Notice"]
