"""HTTPS settings without a running hub: the certificate and key come as a pair, `hub serve`
refuses a pair that does not load before it starts anything, HSTS goes on HTTPS responses
only, and hub clients turn connection failures (hub down, bad URL or CA file, a certificate
for another name or expired) into one line (the e2e test,
``tests/e2e/test_hub_tls_e2e.py``, runs the real server)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
import threading
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.hub.settings import HubSettings
from tributary.hub.transport import StrictTransportSecurity
from tributary.protocol import https
from tributary.services import pki
from tributary.services.system import free_port


@pytest.fixture
def issued(tmp_path: Path) -> pki.IssuedCertificate:
    return pki.issue_server_cert(pki.ensure_ca(tmp_path / "ca"), tmp_path, ["127.0.0.1"])


def test_the_certificate_and_key_come_as_a_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not HubSettings().tls
    assert HubSettings(tls_cert_file=Path("hub.crt"), tls_key_file=Path("hub.key")).tls
    with pytest.raises(ValidationError, match="a TLS certificate is given but no key"):
        HubSettings(tls_cert_file=Path("hub.crt"))
    monkeypatch.setenv("TRIBUTARY_HUB_TLS_KEY_FILE", "hub.key")
    with pytest.raises(ValidationError, match="a TLS key is given but no certificate"):
        HubSettings()
    monkeypatch.setenv("TRIBUTARY_HUB_TLS_CERT_FILE", "hub.crt")
    monkeypatch.setenv("TRIBUTARY_HUB_FORWARDED_ALLOW_IPS", "10.0.0.5")
    settings = HubSettings()
    assert settings.tls and settings.tls_cert_file == Path("hub.crt")
    assert settings.forwarded_allow_ips == "10.0.0.5"


def test_serve_refuses_a_pair_that_does_not_load(tmp_path: Path,
                                                 issued: pki.IssuedCertificate) -> None:
    other = pki.issue_server_cert(pki.ensure_ca(tmp_path / "other-ca"), tmp_path / "other",
                                  ["127.0.0.1"])
    serve = ["hub", "serve", "--port", str(free_port()),
             "--database-url", f"sqlite:///{tmp_path / 'hub.db'}"]
    cases = {
        "a TLS certificate is given but no key": ["--tls-cert", str(issued.cert_path)],
        "a TLS key is given but no certificate": ["--tls-key", str(issued.key_path)],
        "No such file or directory": ["--tls-cert", str(tmp_path / "missing.crt"),
                                      "--tls-key", str(issued.key_path)],
        "KEY_VALUES_MISMATCH": ["--tls-cert", str(issued.cert_path),
                                "--tls-key", str(other.key_path)],
    }
    for message, options in cases.items():
        result = CliRunner().invoke(app, [*serve, *options])
        assert result.exit_code == 2, (message, result.output)
        assert message in _text(result.output), result.output
    assert not (tmp_path / "hub.db").exists()  # refused before anything started


def _text(result_output: str) -> str:
    """The CLI's output as one line, without the boxes rich draws around errors."""
    return " ".join(result_output.replace("│", " ").split())


def test_hsts_goes_on_https_responses_only() -> None:
    def hello(_: object) -> PlainTextResponse:
        return PlainTextResponse("hello")

    inner = Starlette(routes=[Route("/", hello)])

    async def headers(max_age: int, url: str) -> httpx.Headers:
        transport = httpx.ASGITransport(StrictTransportSecurity(inner, max_age=max_age))
        async with httpx.AsyncClient(transport=transport) as client:
            return (await client.get(url)).headers

    assert asyncio.run(headers(600, "https://hub/"))["strict-transport-security"] == \
        "max-age=600"
    assert "strict-transport-security" not in asyncio.run(headers(600, "http://hub/"))
    assert "strict-transport-security" not in asyncio.run(headers(0, "https://hub/"))


def test_hub_commands_say_in_one_line_when_the_hub_is_down(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    commands = (["study", "show", "exp-1", "--hub", down],
                ["study", "list", "--hub", down],
                ["counts", "show", "cnt-1", "--hub", down, "--token", "t"],
                ["broker", "config", "--out", str(tmp_path / "broker"), "--hub-url", down])
    for command in commands:
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1, (command, result.output)
        assert isinstance(result.exception, SystemExit), result.exception
        assert f"cannot reach the hub at {down}: Connection refused" in result.output


def test_hub_commands_explain_a_bad_url_or_ca_file(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    for options, message in (
            (["--hub", "127.0.0.1:8000"], "127.0.0.1:8000 is not a URL for the hub: begin it "
                                          "with https://"),
            (["--hub", "https://127.0.0.1:1", "--hub-ca", str(not_pem)],
             f"--hub-ca: {not_pem} is not a readable PEM CA certificate")):
        result = CliRunner().invoke(app, ["study", "list", *options])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
        assert message in _text(result.output), result.output


def _tls_server(directory: Path, ca: pki.CertificateAuthority, sans: list[str],
                not_after: dt.datetime) -> int:
    """A TLS server (one handshake) with a certificate from ``ca`` for ``sans``."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_after - dt.timedelta(days=30)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    (directory / "hub.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "hub.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "hub.crt", directory / "hub.key")
    server = socket.create_server(("127.0.0.1", 0))

    def handshake() -> None:
        with server, contextlib.suppress(OSError):
            connection, _ = server.accept()
            context.wrap_socket(connection, server_side=True).close()

    threading.Thread(target=handshake, daemon=True).start()
    return int(server.getsockname()[1])


def test_certificate_problems_are_explained(tmp_path: Path) -> None:
    ca = pki.ensure_ca(tmp_path / "ca")
    now = dt.datetime.now(dt.UTC)
    for sans, not_after, message in (
            (["hub.example"], now + dt.timedelta(days=1),
             "the hub's certificate at https://localhost:{port} was not issued for that name "
             "(Hostname mismatch, certificate is not valid for 'localhost')"),
            (["localhost"], now - dt.timedelta(days=1),
             "the hub's certificate at https://localhost:{port} is not valid now "
             "(certificate has expired)")):
        port = _tls_server(tmp_path, ca, sans, not_after)
        url = f"https://localhost:{port}"
        with https.client(url, ca.cert_path, timeout=10) as client, pytest.raises(
                httpx.ConnectError) as raised:
            client.get("/")
        assert https.explain(raised.value, url, "the hub").startswith(message.format(port=port))
