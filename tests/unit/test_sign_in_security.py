"""Sign-in holds against guessing and forgery, on a hub served by uvicorn (plain HTTP and
TLS): failures are throttled per user and per address, unknown users cost the same scrypt
work as known ones, signing out and disabling revoke tokens on the server, the session
cookie is Secure over HTTPS, and forms refuse cross-site posts without their CSRF token."""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlmodel import Session

from tributary.hub.db import make_engine
from tributary.hub.main import create_app
from tributary.hub.services import users
from tributary.hub.services.throttle import SignInThrottle
from tributary.hub.services.users import create_user
from tributary.hub.settings import HubSettings

PASSWORD = "a long enough password"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "hub.crt", directory / "hub.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class ServedHub:
    """A hub app served by uvicorn in a thread, on its own SQLite database."""

    def __init__(self, directory: Path, tls: bool, **settings: object) -> None:
        self.settings = HubSettings.for_directory(
            directory, signing_key=directory / "hub.key", consume_results=False,
            broker_federation="t-signin", **settings)
        self.app = create_app(self.settings)
        port = _free_port()
        ssl: dict[str, str] = {}
        if tls:
            cert, key = _self_signed(directory)
            ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port,
                                                    log_level="warning", **ssl))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServedHub:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "hub did not start"
            time.sleep(0.05)
        with Session(self.app.state.engine) as session:
            create_user(session, "root", PASSWORD, ["admin"])
            create_user(session, "carol", PASSWORD, ["coordinator"])
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=False, timeout=30, **kwargs)  # type: ignore[arg-type]

    def token(self, username: str = "root") -> str:
        with self.client() as client:
            response = client.post("/api/auth/token",
                                   json={"username": username, "password": PASSWORD})
            assert response.status_code == 200, response.text
            return response.json()["access_token"]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[ServedHub]:
    (tmp_path / "plain").mkdir()
    with ServedHub(tmp_path / "plain", tls=False, signin_max_failures_per_user=3,
                   signin_max_failures_per_address=6) as served:
        yield served


@pytest.fixture
def tls_hub(tmp_path: Path) -> Iterator[ServedHub]:
    (tmp_path / "tls").mkdir()
    with ServedHub(tmp_path / "tls", tls=True) as served:
        yield served


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, "the form carries no CSRF token"
    return found.group(1)


def test_failed_sign_ins_are_throttled_per_user_and_per_address(hub: ServedHub) -> None:
    with hub.client() as client:
        def attempt(username: str, password: str = "not the password") -> httpx.Response:
            return client.post("/api/auth/token",
                               json={"username": username, "password": password})

        assert [attempt("carol").status_code for _ in range(3)] == [401] * 3
        refused = attempt("carol", PASSWORD)  # even the right password: the user is throttled
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        # Unknown users are throttled alike (no hint that they do not exist).
        assert [attempt("nobody").status_code for _ in range(3)] == [401] * 3
        assert attempt("nobody").status_code == 429
        # The address has now failed 6 times: every user is refused from it, even root.
        assert attempt("root", PASSWORD).status_code == 429
        form = client.post("/login", data={"username": "root", "password": PASSWORD,
                                           "csrf_token": _csrf(client.get("/login").text)})
        assert form.status_code == 429


def test_unknown_users_cost_the_same_scrypt_work(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_scrypt: Callable[..., bytes] = hashlib.scrypt

    def counting_scrypt(password: bytes, **kw: int) -> bytes:
        calls.append(kw["n"])
        return real_scrypt(password, **kw)

    engine = make_engine(f"sqlite:///{tmp_path / 'u.db'}")
    with Session(engine) as session:
        create_user(session, "carol", PASSWORD, ["coordinator"])
        user = create_user(session, "dave", PASSWORD, ["coordinator"])
        user.disabled = True
        session.add(user)
        session.commit()
        monkeypatch.setattr(hashlib, "scrypt", counting_scrypt)
        assert users.issue_token(session, "carol", "wrong password!!") is None
        known = list(calls)
        calls.clear()
        assert users.issue_token(session, "nobody-at-all", "wrong password!!") is None
        unknown = list(calls)
        calls.clear()
        assert users.issue_token(session, "dave", PASSWORD) is None
        disabled = list(calls)
    assert known == unknown == disabled == [2**14]


def test_sign_out_revokes_the_token_on_the_server(hub: ServedHub) -> None:
    token = hub.token("carol")
    bearer = {"Authorization": f"Bearer {token}"}
    with hub.client() as client:
        assert client.get("/api/auth/me", headers=bearer).status_code == 200
        assert client.post("/api/auth/logout", headers=bearer).status_code == 204
        assert client.get("/api/auth/me", headers=bearer).status_code == 401
    with hub.client() as browser:  # the dashboard: the cookie's token dies with /logout
        login = browser.get("/login")
        browser.post("/login", data={"username": "carol", "password": PASSWORD,
                                     "csrf_token": _csrf(login.text)})
        cookie_token = browser.cookies["tributary_token"]
        page = browser.get("/")
        assert page.status_code == 200
        out = browser.post("/logout", data={"csrf_token": _csrf(page.text)})
        assert out.status_code == 303
    with hub.client() as client:
        stale = client.get("/api/auth/me", headers={"Authorization": f"Bearer {cookie_token}"})
        assert stale.status_code == 401


def test_admins_revoke_tokens_and_disable_users(hub: ServedHub) -> None:
    admin = {"Authorization": f"Bearer {hub.token('root')}"}
    first, second = hub.token("carol"), hub.token("carol")
    with hub.client(headers=admin) as client:
        revoked = client.delete("/api/users/carol/tokens")
        assert revoked.status_code == 200 and revoked.json()["revoked"] == 2
        for old in (first, second):
            assert client.get("/api/auth/me", headers={
                "Authorization": f"Bearer {old}"}).status_code == 401
        third = hub.token("carol")
        disabled = client.post("/api/users/carol/disable")
        assert disabled.status_code == 200 and disabled.json()["disabled"] is True
        assert client.get("/api/auth/me", headers={
            "Authorization": f"Bearer {third}"}).status_code == 401
        assert client.post("/api/auth/token", json={"username": "carol", "password": PASSWORD}
                           ).status_code == 401
        assert client.post("/api/users/carol/enable").json()["disabled"] is False
        assert client.get("/api/auth/me", headers={
            "Authorization": f"Bearer {third}"}).status_code == 401  # revoked for good
        assert client.post("/api/users/nobody/disable").status_code == 404
    with hub.client(headers={"Authorization": f"Bearer {hub.token('carol')}"}) as client:
        assert client.post("/api/users/root/disable").status_code == 403


def test_forms_refuse_cross_site_posts_without_their_token(hub: ServedHub) -> None:
    with hub.client() as attacker:  # a page elsewhere posting to the hub: no token to send
        forged = attacker.post("/login", data={"username": "carol", "password": PASSWORD})
        assert forged.status_code == 403 and "tributary_token" not in attacker.cookies
    with hub.client() as browser:
        login = browser.get("/login")
        signed_in = browser.post("/login", data={"username": "carol", "password": PASSWORD,
                                                 "csrf_token": _csrf(login.text)})
        assert signed_in.status_code == 303 and "tributary_token" in browser.cookies
        token = browser.cookies["tributary_token"]
        # A cross-site form posting with the victim's cookie but without the token:
        assert browser.post("/logout").status_code == 403
        assert browser.post("/logout", data={"csrf_token": "guess"}).status_code == 403
        # ... nor can it call the API with the cookie alone.
        refused = browser.post("/api/counts", json={})
        assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
        with hub.client() as client:
            assert client.get("/api/auth/me", headers={
                "Authorization": f"Bearer {token}"}).status_code == 200


def test_the_cookie_is_secure_over_https(tls_hub: ServedHub, hub: ServedHub) -> None:
    for served, secure in ((tls_hub, True), (hub, False)):
        with served.client() as browser:
            login = browser.get("/login")
            response = browser.post("/login", data={
                "username": "carol", "password": PASSWORD, "csrf_token": _csrf(login.text)})
            cookies = response.headers.get_list("set-cookie")
            session_cookie = next(c for c in cookies if c.startswith("tributary_token="))
            assert ("; secure" in session_cookie.lower()) is secure, session_cookie
            assert "httponly" in session_cookie.lower()
            assert all(("; secure" in c.lower()) is secure
                       for c in login.headers.get_list("set-cookie"))


def test_the_throttle_forgets_failures_after_its_window(tmp_path: Path) -> None:
    now = [1_000_000.0]
    engine = make_engine(f"sqlite:///{tmp_path / 'throttle.db'}")
    throttle = SignInThrottle(engine, 60, max_per_user=2, max_per_address=3,
                              clock=lambda: now[0])
    throttle.failed("Carol", "10.0.0.1")
    throttle.failed("carol", "10.0.0.2")
    assert throttle.retry_after("CAROL", "10.0.0.9") == 60  # usernames compared case-blind
    now[0] += 30.0
    throttle.succeeded("carol")  # (as after a correct password from elsewhere)
    assert throttle.retry_after("carol", "10.0.0.9") is None
    for _ in range(3):
        throttle.failed("dave", "10.0.0.1")
    assert throttle.retry_after("erin", "10.0.0.1") == 60  # the address, for every user
    now[0] += 60.0
    assert throttle.retry_after("erin", "10.0.0.1") is None
    throttle.failed("frank", "10.0.0.3")  # old failures are tidied away as new ones come
    assert throttle.failures() == 2
    engine.dispose()


def test_two_web_processes_share_one_count(tmp_path: Path) -> None:
    """Two hub apps on one database (as two web processes behind a load balancer): the
    failures at either count against the limit at both, so N processes do not allow N
    times the limit."""
    database = f"sqlite:///{tmp_path / 'shared.db'}"
    hubs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        hubs.append(ServedHub(tmp_path / name, tls=False, database_url=database,
                              signin_max_failures_per_user=3,
                              signin_max_failures_per_address=100))
    first, second = hubs
    with first, first.client() as a, _started(second) as served, served.client() as b:
        wrong = {"username": "carol", "password": "not the password"}
        assert a.post("/api/auth/token", json=wrong).status_code == 401
        assert b.post("/api/auth/token", json=wrong).status_code == 401
        assert a.post("/api/auth/token", json=wrong).status_code == 401
        # Three failures in all, two at one and one at the other: both refuse now.
        right = {"username": "carol", "password": PASSWORD}
        assert b.post("/api/auth/token", json=right).status_code == 429
        assert a.post("/api/auth/token", json=right).status_code == 429


@contextlib.contextmanager
def _started(hub: ServedHub) -> Iterator[ServedHub]:
    """Serve ``hub`` without creating its users again (another app on its database did)."""
    hub.thread.start()
    deadline = time.monotonic() + 60
    while not hub.server.started:
        assert time.monotonic() < deadline and hub.thread.is_alive(), "hub did not start"
        time.sleep(0.05)
    try:
        yield hub
    finally:
        hub.__exit__()
