"""Brokers near the spokes: a hub broker and an edge broker on loopback, joined by the
generated duplex network bridge. The hub talks to the hub broker, a spoke to the edge; the
hub broker is restarted mid-stream (which cuts the bridge) while both sides keep
publishing persistent messages, and every message arrives exactly once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tributary.protocol.broker import Delivery, StompClient, publish_with_retry
from tributary.protocol.destinations import RESULTS_QUEUE, spoke_queue
from tributary.services.broker_network import BrokerNetwork, EdgeBroker, generate_network
from tributary.services.broker_security import (
    BrokerSecurityBundle,
    start_broker,
    stop_broker,
)
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port

pytestmark = pytest.mark.e2e

SPOKE = "site-far"
N = 60


class Inbox:
    """Counts message ids as a consumer sees them (acknowledging each)."""

    def __init__(self, client: StompClient) -> None:
        self.client = client
        self.ids: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, delivery: Delivery) -> None:
        with self.lock:
            self.ids[delivery.body.decode()] += 1
        self.client.ack(delivery)

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.ids) < count:
            time.sleep(0.2)


@pytest.fixture
def network(tmp_path: Path, service_settings: ServiceSettings,
            ) -> Iterator[tuple[BrokerSecurityBundle, BrokerSecurityBundle]]:
    host = service_settings.host
    spec = BrokerNetwork(hub_bridge_port=free_port(host), edges=[
        EdgeBroker(name="far", host=host, port=free_port(host), spokes=[SPOKE])])
    hub, edges = generate_network(tmp_path / "brokers", spec, spoke_ids=["site-near"],
                                  host=host, stomp_ssl_port=free_port(host))
    edge = edges["far"]
    start_broker(hub)
    start_broker(edge)
    yield hub, edge
    stop_broker(edge)
    stop_broker(hub)


def test_bridge_outage_loses_and_duplicates_nothing(
        network: tuple[BrokerSecurityBundle, BrokerSecurityBundle]) -> None:
    hub_broker, edge_broker = network
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

        def publish(client: StompClient, destination: str, prefix: str) -> None:
            for i in range(N):
                publish_with_retry(client, destination, f"{prefix}-{i}", attempts=20)
                sent[prefix] += 1
                time.sleep(0.05)

        senders = [
            threading.Thread(target=publish, args=(spoke, RESULTS_QUEUE, "result")),
            threading.Thread(target=publish, args=(hub, spoke_queue(SPOKE), "case")),
        ]
        for sender in senders:
            sender.start()
        # Mid-stream: the bridge goes down with the hub broker; the spoke keeps publishing
        # results into its edge, which must hold them until the bridge is back.
        results.wait_for(N // 4, 30)
        assert 0 < len(results.ids) < N, "the stream should be running when the bridge dies"
        stop_broker(hub_broker)
        before = sent["result"]
        time.sleep(3)
        # Results the spoke sent meanwhile are held by the edge (store-and-forward).
        assert sent["result"] > before, "the edge should accept results while cut off"
        start_broker(hub_broker)
        for sender in senders:
            sender.join(60)
        results.wait_for(N, 45)
        work.wait_for(N, 30)
    finally:
        spoke.close()
        hub.close()

    assert sorted(results.ids) == sorted(f"result-{i}" for i in range(N))
    assert sorted(work.ids) == sorted(f"case-{i}" for i in range(N))
    assert max(results.ids.values()) == 1, "a result crossed the bridge twice"
    assert max(work.ids.values()) == 1, "a case message crossed the bridge twice"
