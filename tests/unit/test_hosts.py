"""The separate-hosts harness without namespaces: its names, addresses and firewall rules,
and the probes that tell a TLS-only port from a plaintext one (against real local
servers)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tributary.services import pki
from tributary.testbed import netprobe
from tributary.testbed.hosts import Hosts


def test_names_fit_linux_limits_and_are_validated() -> None:
    hosts = Hosts([f"spoke-{i}" for i in range(62)])
    assert len(hosts.prefix) <= 10
    assert len(f"{hosts.prefix}h61") <= 15 and len(f"{hosts.prefix}hr") <= 15
    for bad in ("Upper", "with-dash", "waytoolongprefix", "1digit"):
        with pytest.raises(ValueError):
            Hosts(["a"], prefix=bad)
    with pytest.raises(ValueError):
        Hosts([f"s{i}" for i in range(63)])
    with pytest.raises(ValueError):
        Hosts(["a", "a"])
    with pytest.raises(ValueError):
        Hosts(["hub"])


def test_firewalls_open_only_the_published_ports_of_the_hub_address() -> None:
    hosts = Hosts(["a"], network="10.9.8.0/24")
    assert hosts.hub_address == "10.9.8.1"
    hosts.ports = [61614, 8443]
    spoke, hub = hosts.rules("a"), hosts.rules("hub")
    for rules in (spoke, hub):
        assert ":INPUT DROP" in rules and ":FORWARD DROP" in rules
    assert ":OUTPUT DROP" in spoke and ":OUTPUT ACCEPT" in hub
    for port in (61614, 8443):
        assert f"-A OUTPUT -d 10.9.8.1/32 -p tcp --dport {port} " in spoke
        assert f"-A INPUT -d 10.9.8.1/32 -p tcp --dport {port} " in hub
    assert spoke.count("--dport") == 2 and hub.count("--dport") == 2
    assert "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT" in spoke
    with pytest.raises(ValueError):
        hosts.rules("root")


def _serve(server: socket.socket, answer: bytes, context: ssl.SSLContext | None) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        try:
            if context is not None:
                conn = context.wrap_socket(conn, server_side=True)
            conn.recv(1024)
            conn.sendall(answer)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """(plaintext HTTP port, TLS-only port, its CA)."""
    ca = pki.ensure_ca(tmp_path / "ca")
    cert = pki.issue_server_cert(ca, tmp_path / "server", ["127.0.0.1"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert.cert_path, cert.key_path)
    plain, tls = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    for server, ctx in ((plain, None), (tls, context)):
        threading.Thread(target=_serve, args=(server, b"HTTP/1.1 200 OK\r\n\r\n", ctx),
                         daemon=True).start()
    yield plain.getsockname()[1], tls.getsockname()[1], ca.cert_path
    plain.close()
    tls.close()


def test_probes_tell_tls_only_from_plaintext(servers: tuple[int, int, Path],
                                            tmp_path: Path) -> None:
    plain_port, tls_port, ca = servers
    assert netprobe.plain("127.0.0.1", plain_port, "http")["plaintext"] is True
    assert netprobe.plain("127.0.0.1", tls_port, "http")["plaintext"] is False
    assert netprobe.plain("127.0.0.1", tls_port, "stomp")["plaintext"] is False
    assert netprobe.tls("127.0.0.1", tls_port, str(ca))["handshake"] is True
    assert netprobe.tls("127.0.0.1", plain_port, str(ca))["handshake"] is False
    other = pki.ensure_ca(tmp_path / "other-ca").cert_path
    refused = netprobe.tls("127.0.0.1", tls_port, str(other))
    assert refused["handshake"] is False and "CERTIFICATE_VERIFY_FAILED" in refused["error"]
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    assert netprobe.connect("127.0.0.1", port)["connected"] is False
    assert netprobe.connect("127.0.0.1", plain_port)["connected"] is True
