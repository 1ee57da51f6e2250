"""Brokers near the spokes: a hub broker and an edge broker on loopback, joined by the
generated duplex network bridge (through a TCP relay the test can cut). The hub talks to
the hub broker, a spoke to the edge; the bridge is cut mid-stream while both sides keep
publishing persistent messages, and once it reconnects every message arrives exactly once."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.protocol.broker import Delivery, StompClient, publish_with_retry
from tributary.protocol.cohorts.vertical import hub_vertical_queue, spoke_vertical_queue
from tributary.protocol.destinations import DEFAULT_FEDERATION, RESULTS_QUEUE, spoke_queue
from tributary.protocol.training.transport import hub_training_queue, spoke_training_queue
from tributary.services.broker_network import generate_network, load_network
from tributary.services.broker_security import (
    BrokerSecurityBundle,
    load_bundle,
    start_broker,
    stop_broker,
)
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port

pytestmark = pytest.mark.e2e

SPOKE = "site-far"
N = 60


class Inbox:
    """Counts the message ids a consumer accepted (acknowledged). A delivery whose
    acknowledgement could not be sent, because the consumer's own broker went down under it,
    comes again; consumers deduplicate those by id, so they are counted apart, as
    ``unacked``. A message the bridge stored twice would be accepted twice."""

    def __init__(self, client: StompClient) -> None:
        self.client = client
        self.ids: Counter[str] = Counter()
        self.unacked: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, delivery: Delivery) -> None:
        body = delivery.body.decode()
        acked = self.client.ack(delivery)
        with self.lock:
            if acked:
                self.ids[body] += 1
            else:
                self.unacked.append(body)

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.ids) < count:
            time.sleep(0.2)


class Relay:
    """A TCP relay in front of the hub broker's bridge port; ``cut`` drops the bridge (and
    refuses new connections) without touching either broker or any client."""

    def __init__(self, host: str, port: int, target: int) -> None:
        self.host, self.port, self.target = host, port, target
        self.conns: list[socket.socket] = []
        self.server: socket.socket | None = None

    def open(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((self.host, self.port))
        server.listen()
        self.server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.host, self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self.server is not None:
            with contextlib.suppress(OSError):  # wakes the accepting thread, stops listening
                self.server.shutdown(socket.SHUT_RDWR)
            self.server.close()
            self.server = None
        for sock in self.conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.conns = []


@pytest.fixture
def network(tmp_path: Path, service_settings: ServiceSettings,
            ) -> Iterator[tuple[BrokerSecurityBundle, BrokerSecurityBundle, Relay]]:
    host = service_settings.host
    out = tmp_path / "brokers"
    bridge_port = free_port(host)
    run = CliRunner().invoke(app, [
        "broker", "config", "--out", str(out), "--host", host,
        "--port", str(free_port(host)), "--spoke", "site-near",
        "--edge", f"far={host}:{free_port(host)}", "--edge-spoke", f"far={SPOKE}",
        "--bridge-port", str(bridge_port)])
    assert run.exit_code == 0, run.output
    # The edge dials the relay, which forwards to the hub broker's bridge port.
    relay = Relay(host, free_port(host), bridge_port)
    spec = load_network(out).model_copy(update={"hub_bridge_dial_port": relay.port})
    hub, edges = generate_network(out, spec, spoke_ids=["site-near"], host=host,
                                  stomp_ssl_port=load_bundle(out).stomp_ssl_port)
    relay.open()
    start_broker(hub)
    start_broker(edges["far"])
    yield hub, edges["far"], relay
    relay.cut()
    stop_broker(edges["far"])
    stop_broker(hub)


def test_bridge_outage_loses_and_duplicates_nothing(
        network: tuple[BrokerSecurityBundle, BrokerSecurityBundle, Relay]) -> None:
    hub_broker, edge_broker, relay = network
    # Edge config: exactly the results queue and this spoke's queue cross the bridge.
    xml = edge_broker.config_path.read_text()
    assert "tributary.spoke.site-far" in xml and "tributary.spoke.site-near" not in xml

    hub = StompClient(hub_broker.broker_settings("hub"), "hub").start(wait=15)
    spoke = StompClient(edge_broker.broker_settings(SPOKE), SPOKE).start(wait=15)
    try:
        results, work = Inbox(hub), Inbox(spoke)
        hub.subscribe(RESULTS_QUEUE, results)
        spoke.subscribe(spoke_queue(SPOKE), work)

        sent: Counter[str] = Counter()
        cut = threading.Event()

        def publish(client: StompClient, destination: str, prefix: str,
                    second_half_after: threading.Event) -> None:
            for i in range(N):
                if i == N // 2:
                    second_half_after.wait(60)
                publish_with_retry(client, destination, f"{prefix}-{i}", attempts=20)
                sent[prefix] += 1
                time.sleep(0.02)

        senders = [  # the second halves go out while the bridge is down
            threading.Thread(target=publish, args=(spoke, RESULTS_QUEUE, "result", cut)),
            threading.Thread(target=publish, args=(hub, spoke_queue(SPOKE), "case", cut)),
        ]
        for sender in senders:
            sender.start()
        results.wait_for(N // 4, 30)
        assert len(results.ids) >= N // 4, "results should cross the bridge before the cut"
        relay.cut()  # the bridge goes down; brokers and clients stay up
        cut.set()
        deadline = time.monotonic() + 30
        while min(sent["result"], sent["case"]) < N and time.monotonic() < deadline:
            time.sleep(0.1)
        # Every result is now in the edge's store and every case message in the hub
        # broker's, the second halves sent while cut off; none of those crossed.
        assert sent["result"] == sent["case"] == N, "brokers should accept while cut off"
        time.sleep(2)
        assert len(results.ids) <= N // 2 and len(work.ids) <= N // 2
        relay.open()  # the edge reconnects its bridge by itself
        for sender in senders:
            sender.join(60)
        results.wait_for(N, 45)
        work.wait_for(N, 30)
    finally:
        spoke.close()
        hub.close()

    assert sorted(results.ids) == sorted(f"result-{i}" for i in range(N))
    assert sorted(work.ids) == sorted(f"case-{i}" for i in range(N))
    assert max(results.ids.values()) == 1, f"a result was accepted twice: {results.ids}"
    assert max(work.ids.values()) == 1, f"a case message was accepted twice: {work.ids}"


def test_training_and_vertical_queues_cross_the_bridge(
        network: tuple[BrokerSecurityBundle, BrokerSecurityBundle, Relay]) -> None:
    """A spoke behind an edge broker takes part in federated and vertical training: the
    hub's round and column messages reach it through the bridge, and its updates reach the
    hub; another spoke's training queue is not carried (nor writable by this spoke)."""
    hub_broker, edge_broker, _relay = network
    xml = edge_broker.config_path.read_text()
    assert f"tributary.spoke.{SPOKE}.training" in xml and "tributary.vertical" in xml
    assert "tributary.spoke.site-near.training" not in xml
    hub = StompClient(hub_broker.broker_settings("hub"), "hub").start(wait=15)
    spoke = StompClient(edge_broker.broker_settings(SPOKE), SPOKE).start(wait=15)
    try:
        at_hub, at_spoke = Inbox(hub), Inbox(spoke)
        for destination in (hub_training_queue(DEFAULT_FEDERATION),
                            hub_vertical_queue(DEFAULT_FEDERATION)):
            hub.subscribe(destination, at_hub)
        for destination in (spoke_training_queue(SPOKE, DEFAULT_FEDERATION),
                            spoke_vertical_queue(SPOKE, DEFAULT_FEDERATION)):
            spoke.subscribe(destination, at_spoke)
        for i in range(3):
            publish_with_retry(hub, spoke_training_queue(SPOKE, DEFAULT_FEDERATION),
                               f"round-{i}", attempts=20)
            publish_with_retry(hub, spoke_vertical_queue(SPOKE, DEFAULT_FEDERATION),
                               f"columns-{i}", attempts=20)
            publish_with_retry(spoke, hub_training_queue(DEFAULT_FEDERATION), f"update-{i}",
                               attempts=20)
            publish_with_retry(spoke, hub_vertical_queue(DEFAULT_FEDERATION), f"share-{i}",
                               attempts=20)
        at_spoke.wait_for(6, 45)
        at_hub.wait_for(6, 45)
    finally:
        spoke.close()
        hub.close()
    assert sorted(at_spoke.ids) == sorted(
        [f"round-{i}" for i in range(3)] + [f"columns-{i}" for i in range(3)])
    assert sorted(at_hub.ids) == sorted(
        [f"update-{i}" for i in range(3)] + [f"share-{i}" for i in range(3)])
    assert max(at_spoke.ids.values()) == max(at_hub.ids.values()) == 1
