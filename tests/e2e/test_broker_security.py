"""Broker security against a real ActiveMQ running the generated configuration: mutual TLS
keeps out clients without one of our certificates, and the authorization map confines each
spoke to its own queue and the results queue."""

from __future__ import annotations

import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import stomp
import stomp.exception
from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.protocol.broker import (
    Delivery,
    PublishError,
    StompClient,
    end_io_loop_on_tls_eof,
)
from tributary.protocol.cohorts.vertical import hub_vertical_queue, spoke_vertical_queue
from tributary.protocol.destinations import (
    DEFAULT_FEDERATION,
    RESULTS_QUEUE,
    dead_letter_queue,
    results_queue,
    spoke_queue,
)
from tributary.protocol.training.transport import hub_training_queue, spoke_training_queue
from tributary.services import pki
from tributary.services.broker_security import (
    BrokerSecurityBundle,
    generate_broker_config,
    load_bundle,
    start_broker,
    stop_broker,
)
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation

pytestmark = pytest.mark.e2e

A, B = "site-a", "site-b"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory,
           service_settings: ServiceSettings) -> Iterator[BrokerSecurityBundle]:
    out = tmp_path_factory.mktemp("broker-security") / "config"
    generated = generate_broker_config(out, spoke_ids=[A, B], host=service_settings.host,
                                       stomp_ssl_port=free_port(service_settings.host))
    start_broker(generated)
    yield generated
    stop_broker(generated)


@pytest.fixture
def clients(bundle: BrokerSecurityBundle) -> Iterator[dict[str, StompClient]]:
    started = {name: StompClient(bundle.broker_settings(name), name).start(wait=15)
               for name in ("hub", A, B)}
    yield started
    for client in started.values():
        client.close()


class Recorder(stomp.ConnectionListener):
    def __init__(self) -> None:
        self.errors: queue.Queue[str] = queue.Queue()
        self.messages: queue.Queue[str] = queue.Queue()
        self.receipts: queue.Queue[str] = queue.Queue()
        self.disconnected = threading.Event()

    def on_error(self, frame: stomp.utils.Frame) -> None:
        self.errors.put(frame.headers.get("message", ""))

    def on_message(self, frame: stomp.utils.Frame) -> None:
        self.messages.put(frame.body)

    def on_receipt(self, frame: stomp.utils.Frame) -> None:
        self.receipts.put(frame.headers.get("receipt-id", ""))

    def on_disconnected(self) -> None:
        self.disconnected.set()


def raw_connect(bundle: BrokerSecurityBundle, user: str, password: str | None,
                cert: tuple[Path, Path] | None, tls: bool = True
                ) -> tuple[stomp.Connection12, Recorder]:
    """A bare stomp.py connection, to see the broker's answer without our client's retries."""
    where = (bundle.host, bundle.stomp_ssl_port)
    conn = stomp.Connection12([where], reconnect_attempts_max=1, timeout=5, heartbeats=(0, 0))
    if tls:
        conn.set_ssl(for_hosts=[where], ca_certs=str(bundle.ca_file),
                     cert_file=str(cert[0]) if cert else None,
                     key_file=str(cert[1]) if cert else None)
        end_io_loop_on_tls_eof(conn)
    recorder = Recorder()
    conn.set_listener("test", recorder)
    conn.connect(user, password, wait=True)
    return conn, recorder


def connect_as(bundle: BrokerSecurityBundle, name: str) -> tuple[stomp.Connection12, Recorder]:
    identity = bundle.identity(name)
    return raw_connect(bundle, name, None, (identity.cert_file, identity.key_file))


def assert_refused(bundle: BrokerSecurityBundle, user: str, password: str | None,
                   cert: tuple[Path, Path] | None, tls: bool = True) -> None:
    try:
        conn, _ = raw_connect(bundle, user, password, cert, tls)
    except (stomp.exception.StompException, OSError):  # refused at TLS or at CONNECT
        return
    conn.disconnect()
    pytest.fail(f"the broker accepted {user} (tls={tls}, certificate={cert is not None})")


def collect(client: StompClient, destination: str) -> queue.Queue[Delivery]:
    box: queue.Queue[Delivery] = queue.Queue()
    client.subscribe(destination, box.put)
    return box


def test_hub_reaches_a_spoke_and_the_spoke_reports_back(
        clients: dict[str, StompClient]) -> None:
    body = f'{{"experiment": "{uuid.uuid4().hex}"}}'
    clients["hub"].publish(spoke_queue(A), body)
    got = collect(clients[A], spoke_queue(A)).get(timeout=10)
    assert got.body == body.encode()
    assert clients[A].ack(got)

    clients[A].publish(RESULTS_QUEUE, body)
    result = collect(clients["hub"], RESULTS_QUEUE).get(timeout=10)
    assert result.body == body.encode()
    assert clients["hub"].ack(result)


def test_a_spokes_nack_reaches_its_dead_letter_queue(clients: dict[str, StompClient]) -> None:
    body = f'{{"poison": "{uuid.uuid4().hex}"}}'
    clients["hub"].publish(spoke_queue(B), body)
    assert clients[B].nack(collect(clients[B], spoke_queue(B)).get(timeout=10))
    dead = collect(clients["hub"], dead_letter_queue(spoke_queue(B))).get(timeout=10)
    assert dead.body == body.encode()
    clients["hub"].ack(dead)


@pytest.mark.parametrize(("to_spoke", "to_hub"), [
    (spoke_training_queue(A, DEFAULT_FEDERATION), hub_training_queue(DEFAULT_FEDERATION)),
    (spoke_vertical_queue(A, DEFAULT_FEDERATION), hub_vertical_queue(DEFAULT_FEDERATION))])
def test_training_queues_carry_the_hub_to_a_spoke_and_back(
        clients: dict[str, StompClient], to_spoke: str, to_hub: str) -> None:
    body = f'{{"round": "{uuid.uuid4().hex}"}}'
    clients["hub"].publish(to_spoke, body)
    got = collect(clients[A], to_spoke).get(timeout=10)
    assert got.body == body.encode() and clients[A].ack(got)
    clients[A].publish(to_hub, body)
    back = collect(clients["hub"], to_hub).get(timeout=10)
    assert back.body == body.encode() and clients["hub"].ack(back)


@pytest.mark.parametrize("destination", [
    spoke_queue(B), RESULTS_QUEUE, dead_letter_queue(spoke_queue(B)),
    spoke_training_queue(B, DEFAULT_FEDERATION), hub_training_queue(DEFAULT_FEDERATION),
    spoke_vertical_queue(B, DEFAULT_FEDERATION), hub_vertical_queue(DEFAULT_FEDERATION)])
def test_a_spoke_cannot_read_what_is_not_its_own(bundle: BrokerSecurityBundle,
                                                 destination: str) -> None:
    hub = StompClient(bundle.broker_settings("hub"), "hub").start(wait=15)
    secret = f'{{"for": "{B}", "n": "{uuid.uuid4().hex}"}}'
    hub.publish(destination, secret)
    hub.close()
    conn, seen = connect_as(bundle, A)
    try:
        conn.subscribe(destination, id="snoop", ack="client-individual", receipt="snoop")
        assert "not authorized to read" in seen.errors.get(timeout=10)
        with pytest.raises(queue.Empty):
            seen.messages.get(timeout=1)
    finally:
        if conn.is_connected():
            conn.disconnect()
    # The message is untouched and still there for its rightful reader.
    reader = B if destination.startswith(spoke_queue(B)) else "hub"
    owner = StompClient(bundle.broker_settings(reader), reader).start(wait=15)
    try:
        box = collect(owner, destination)
        while (got := box.get(timeout=10)).body != secret.encode():
            owner.ack(got)  # earlier tests' leftovers
        owner.ack(got)
    finally:
        owner.close()


@pytest.mark.parametrize("destination", [
    spoke_queue(B), "/queue/tributary.anything", f"/topic/tributary.spoke.{B}",
    spoke_training_queue(B, DEFAULT_FEDERATION), spoke_vertical_queue(B, DEFAULT_FEDERATION)])
def test_a_spoke_cannot_write_to_another_spoke(clients: dict[str, StompClient],
                                               destination: str) -> None:
    with pytest.raises(PublishError, match="not authorized to write"):
        clients[A].publish(destination, '{"forged": true}')


def test_a_client_without_a_certificate_cannot_connect(bundle: BrokerSecurityBundle) -> None:
    assert_refused(bundle, A, None, cert=None)  # TLS, but no client certificate
    assert_refused(bundle, A, None, cert=None, tls=False)  # plain STOMP


def test_a_certificate_from_another_ca_cannot_connect(bundle: BrokerSecurityBundle,
                                                      tmp_path: Path) -> None:
    rogue_ca = pki.ensure_ca(tmp_path / "rogue-ca", common_name="Tributary broker CA")
    rogue = pki.issue_client_cert(rogue_ca, tmp_path / "rogue", A)
    assert_refused(bundle, A, None, (rogue.cert_path, rogue.key_path))


def test_the_identity_is_the_certificate_not_the_login_name(
        bundle: BrokerSecurityBundle) -> None:
    """Spoke A's certificate logging in as "hub" is still spoke A: it cannot write to
    spoke B's queue nor read the results queue."""
    mine = bundle.broker_settings(A).model_copy(update={"user": "hub"})
    client = StompClient(mine, "impostor").start(wait=15)
    try:
        with pytest.raises(PublishError, match="not authorized to write"):
            client.publish(spoke_queue(B), '{"forged": true}')
    finally:
        client.close()
    conn, recorder = raw_connect(bundle, "hub", None, (bundle.identity(A).cert_file,
                                                        bundle.identity(A).key_file))
    try:
        conn.subscribe(RESULTS_QUEUE, id="peek", ack="client-individual")
        assert "not authorized to read" in recorder.errors.get(timeout=10)
    finally:
        if conn.is_connected():
            conn.disconnect()


def test_a_tls_client_notices_a_broker_restart_and_reconnects(
        bundle: BrokerSecurityBundle) -> None:
    hub = StompClient(bundle.broker_settings("hub"), "hub").start(wait=15)
    try:
        stop_broker(bundle)
        deadline = time.monotonic() + 10
        while hub.connected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not hub.connected, "the closed TLS connection went unnoticed"
        start_broker(bundle)
        assert hub.wait_connected(30)
        hub.publish(spoke_queue(A), '{"after": "restart"}')
    finally:
        hub.close()


def test_config_command_takes_the_hubs_registered_spokes(federation: LocalFederation,
                                                        tmp_path: Path, unique: str) -> None:
    registered = f"reg-{unique}"
    with federation.api() as api:
        api.post("/api/spokes", json={"id": registered, "name": "Registered"}).raise_for_status()
    out = tmp_path / "broker"
    args = ["broker", "config", "--out", str(out), "--hub-url", federation.hub_url,
            "--token", federation.admin_token, "--spoke", f"extra-{unique}", "--port", "61999"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    bundle = load_bundle(out)
    assert {registered, f"extra-{unique}"} <= set(bundle.spokes)
    assert bundle.stomp_ssl_port == 61999
    assert "PRIVATE KEY" not in first.output
    for private in (bundle.config_path, bundle.identity(registered).key_file,
                    out / "pki" / "ca.key", out / "jaas"):
        assert private.stat().st_mode & 0o077 == 0, private

    groups = (out / "jaas" / "groups.properties").read_text()
    assert f"tributary.spoke.{registered}={registered}\n" in groups
    assert f"{registered}=CN={registered}\n" in (out / "jaas" / "users.properties").read_text()

    # Regenerating keeps every certificate; --rotate replaces them.
    cert = bundle.identity(registered).cert_file.read_bytes()
    assert CliRunner().invoke(app, args).exit_code == 0
    assert bundle.identity(registered).cert_file.read_bytes() == cert
    assert CliRunner().invoke(app, [*args, "--rotate"]).exit_code == 0
    assert bundle.identity(registered).cert_file.read_bytes() != cert


def test_a_named_federation_crosses_its_own_queues_only(tmp_path: Path,
                                                       service_settings: ServiceSettings
                                                       ) -> None:
    """A broker written with ``--federation west`` carries the ``west.*`` queues a hub with
    ``broker_federation = "west"`` and its spokes use; the default federation's are closed
    (before, the map named only ``tributary.*`` queues, so such a federation could not run
    on a secured broker at all)."""
    out = tmp_path / "west"
    written = CliRunner().invoke(app, [
        "broker", "config", "--out", str(out), "--spoke", A, "--host", service_settings.host,
        "--port", str(free_port(service_settings.host)), "--federation", "west"])
    assert written.exit_code == 0, written.output
    assert "federation west" in written.output
    bundle = load_bundle(out)
    assert bundle.broker_settings(A).federation == "west"
    start_broker(bundle)
    try:
        hub = StompClient(bundle.broker_settings("hub"), "hub").start(wait=15)
        spoke = StompClient(bundle.broker_settings(A), A).start(wait=15)
        try:
            for to_spoke, to_hub in [
                    (spoke_queue(A, "west"), results_queue("west")),
                    (spoke_training_queue(A, "west"), hub_training_queue("west")),
                    (spoke_vertical_queue(A, "west"), hub_vertical_queue("west"))]:
                body = f'{{"west": "{uuid.uuid4().hex}"}}'
                hub.publish(to_spoke, body)
                got = collect(spoke, to_spoke).get(timeout=10)
                assert got.body == body.encode() and spoke.ack(got)
                spoke.publish(to_hub, body)
                back = collect(hub, to_hub).get(timeout=10)
                assert back.body == body.encode() and hub.ack(back)
            for closed in (RESULTS_QUEUE, spoke_queue(A)):  # the default federation's
                with pytest.raises(PublishError, match="not authorized to write"):
                    spoke.publish(closed, '{"wrong": "federation"}')
        finally:
            spoke.close()
            hub.close()
    finally:
        stop_broker(bundle)
