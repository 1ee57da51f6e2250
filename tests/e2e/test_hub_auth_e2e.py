"""Authentication and roles on the hub API and pages, and who-did-what in the audit trail."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest

from tributary.testbed.federation import LocalFederation

pytestmark = pytest.mark.e2e


def make_user(federation: LocalFederation, role: str, org: str = "Org A") -> tuple[str, str]:
    name, password = f"{role}-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    with federation.api() as api:
        api.post("/api/users", json={"username": name, "password": password, "roles": [role],
                                     "organisation": org}).raise_for_status()
    return name, federation.sign_in(name, password)


def test_api_requires_a_token(federation: LocalFederation) -> None:
    anonymous = httpx.get(f"{federation.hub_url}/api/experiments")
    assert anonymous.status_code == 401
    bogus = httpx.get(f"{federation.hub_url}/api/experiments",
                      headers={"Authorization": "Bearer not-a-token"})
    assert bogus.status_code == 401
    wrong = httpx.post(f"{federation.hub_url}/api/auth/token",
                       json={"username": "admin", "password": "wrong password!"})
    assert wrong.status_code == 401
    page = httpx.get(f"{federation.hub_url}/", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login"


def test_roles_limit_what_each_user_can_do(federation: LocalFederation) -> None:
    _dev, dev_token = make_user(federation, "developer")
    coordinator, coord_token = make_user(federation, "coordinator")
    spoke_id = f"roles-{uuid.uuid4().hex[:6]}"
    with federation.api(coord_token) as api:
        assert api.get("/api/experiments").status_code == 200
        refused = api.post("/api/spokes", json={"id": spoke_id, "name": "x"})
        assert refused.status_code == 403 and "lacks the role" in refused.json()["detail"]
        assert api.post("/api/users", json={"username": "mallory", "password": "x" * 12,
                                            "roles": ["admin"]}).status_code == 403
    with federation.api(dev_token) as api:
        assert api.post("/api/experiments", json={
            "name": "x", "algorithm_id": 1, "spoke_ids": ["a"]}).status_code == 403
        assert api.get("/api/audit").status_code == 403
    with federation.api() as api:
        assert api.post("/api/spokes", json={"id": spoke_id, "name": "x"}).status_code == 201
        entries = api.get("/api/audit", params={"action": "spoke.registered",
                                                "target": spoke_id}).json()
        assert [e["actor"] for e in entries] == ["admin"]
        created = api.get("/api/audit", params={"action": "user.created",
                                                "target": coordinator}).json()
        assert created[0]["actor"] == "admin"


def test_dashboard_sign_in_sets_a_session_cookie(federation: LocalFederation) -> None:
    with httpx.Client(base_url=federation.hub_url, follow_redirects=True) as browser:
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/login").text)
        assert csrf is not None
        failed = browser.post("/login", data={"username": "admin", "password": "nope nope nope",
                                              "csrf_token": csrf.group(1)})
        assert "Wrong username or password" in failed.text
        browser.post("/login", data={"username": "admin", "csrf_token": csrf.group(1),
                                     "password": federation.admin_password})
        page = browser.get("/")
        assert page.status_code == 200 and "Experiments" in page.text
