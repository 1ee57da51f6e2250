"""The hub over HTTPS, as an operator runs it (`tributary hub serve --tls-cert --tls-key`)
and as clients meet it: plain HTTP gets no answer, a client that does not trust the CA is
refused and the CLI says why in one line, `--hub-ca` (or TRIBUTARY_HUB_CA_FILE) makes it
work, the session cookie is Secure and responses carry HSTS. Behind a proxy, the hub
believes X-Forwarded-Proto only from the addresses it is told to."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tributary.protocol import https
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import HubTls, LocalFederation

UNTRUSTED = ("the hub's certificate at {url} is not signed by a CA this client trusts; "
             "pass --hub-ca FILE or set TRIBUTARY_HUB_CA_FILE")


@pytest.fixture(scope="module")
def tls_hub(tmp_path_factory: pytest.TempPathFactory,
            service_settings: ServiceSettings) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("tls-hub")
    federation = LocalFederation(root, service_settings, hub_tls=HubTls.issue(root / "tls"))
    federation.start_hub()  # its readiness check already verifies with the CA
    yield federation
    federation.stop()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TRIBUTARY_HUB_CA_FILE", "TRIBUTARY_HUB_URL", "TRIBUTARY_TOKEN")}
    return subprocess.run([sys.executable, "-m", "tributary.cli", *args], text=True,
                          capture_output=True, timeout=60, env={**clean, **(env or {})})


def _sign_in_with_the_form(client: httpx.Client, password: str,
                           headers: dict[str, str] | None = None) -> httpx.Response:
    """As a browser: the login page, then its form with the CSRF token and cookie (sent by
    hand: a client's cookie jar keeps a Secure cookie from a plain-HTTP connection)."""
    login = client.get("/login", headers=headers)
    token = re.search(r'name="csrf_token" value="([^"]+)"', login.text)
    assert token, login.text
    client.cookies.clear()
    return client.post("/login", data={
        "username": "admin", "password": password, "csrf_token": token.group(1)},
        headers={**(headers or {}), "Cookie": f"tributary_csrf={token.group(1)}"})


def _session_cookie(response: httpx.Response) -> str:
    return next(c for c in response.headers.get_list("set-cookie")
                if c.startswith("tributary_token="))


def test_plain_http_to_the_tls_port_gets_no_http_answer(tls_hub: LocalFederation) -> None:
    with socket.create_connection(("127.0.0.1", tls_hub.hub_port), timeout=10) as raw:
        raw.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer
    plain = tls_hub.hub_url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/api/health", timeout=10)
    # The CLI says what is wrong with such a URL.
    result = _cli("study", "list", "--hub", plain, "--token", tls_hub.admin_token)
    assert result.returncode == 1, result
    assert "use an https:// URL" in result.stderr and "Traceback" not in result.stderr


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_hub: LocalFederation,
                                                       tmp_path: Path) -> None:
    other_ca = HubTls.issue(tmp_path / "other").ca_file
    for ca_file in (None, other_ca):  # the system's store, and another federation's CA
        with https.client(tls_hub.hub_url, ca_file, timeout=10) as client, pytest.raises(
                httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            client.get("/api/health")
    for args, env in (([], {}), (["--hub-ca", str(other_ca)], {}),
                      ([], {"TRIBUTARY_HUB_CA_FILE": str(other_ca)})):
        result = _cli("study", "list", "--hub", tls_hub.hub_url, "--token",
                      tls_hub.admin_token, *args, env=env)
        assert result.returncode == 1, result
        assert UNTRUSTED.format(url=tls_hub.hub_url) in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_the_cli_works_with_the_hubs_ca(tls_hub: LocalFederation) -> None:
    by_option = _cli("study", "list", "--hub", tls_hub.hub_url, "--token",
                     tls_hub.admin_token, "--hub-ca", str(tls_hub.hub_ca))
    assert by_option.returncode == 0, by_option.stderr
    assert "state" in by_option.stdout and "algorithm" in by_option.stdout
    by_environment = _cli("study", "show", "exp-missing", env={
        "TRIBUTARY_HUB_URL": tls_hub.hub_url, "TRIBUTARY_TOKEN": tls_hub.admin_token,
        "TRIBUTARY_HUB_CA_FILE": str(tls_hub.hub_ca)})
    assert by_environment.returncode == 1  # reached the hub, which has no such study
    assert "study refused (404)" in by_environment.stderr, by_environment.stderr


def test_the_session_cookie_is_secure_and_responses_carry_hsts(
        tls_hub: LocalFederation) -> None:
    with tls_hub.client() as browser:
        response = _sign_in_with_the_form(browser, tls_hub.admin_password)
        assert response.status_code == 303, response.text
        cookie = _session_cookie(response).lower()
        assert "; secure" in cookie and "httponly" in cookie, cookie
        assert response.headers["strict-transport-security"] == "max-age=31536000"
        assert "strict-transport-security" in browser.get("/api/health").headers


def test_behind_a_proxy_only_a_trusted_one_is_believed(
        tmp_path: Path, service_settings: ServiceSettings) -> None:
    """Plain-HTTP hubs reached from 127.0.0.1 with X-Forwarded-Proto: https. The default
    trusts loopback (a proxy on the same host): cookies are Secure and HSTS is sent; a hub
    told its proxy is elsewhere ignores the header."""
    forwarded = {"X-Forwarded-Proto": "https"}
    for allow, believed in (("127.0.0.1", True), ("192.0.2.7", False)):
        hub = LocalFederation(tmp_path / allow, service_settings,
                              hub_env={"TRIBUTARY_HUB_FORWARDED_ALLOW_IPS": allow})
        hub.start_hub()
        try:
            with hub.client() as browser:
                response = _sign_in_with_the_form(browser, hub.admin_password, forwarded)
                assert response.status_code == 303, response.text
                assert ("; secure" in _session_cookie(response).lower()) is believed
                assert ("strict-transport-security" in response.headers) is believed
        finally:
            hub.stop()
