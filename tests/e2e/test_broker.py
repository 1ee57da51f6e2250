"""The STOMP transport against the real ActiveMQ broker: persistence receipts, one message
in flight, redelivery of unacknowledged messages, dead letters."""

from __future__ import annotations

import queue
import time
import uuid

import pytest

from tributary.protocol.broker import BrokerSettings, Delivery, StompClient
from tributary.protocol.destinations import dead_letter_queue, results_queue
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation

pytestmark = pytest.mark.e2e


def client(settings: ServiceSettings, name: str) -> StompClient:
    return StompClient(BrokerSettings(host=settings.host, port=settings.broker_port),
                       name).start(wait=30)


def collect(c: StompClient, destination: str) -> queue.Queue[Delivery]:
    box: queue.Queue[Delivery] = queue.Queue()
    c.subscribe(destination, box.put)
    return box


def test_round_trip_and_prefetch_one(service_settings: ServiceSettings) -> None:
    dest = f"/queue/test.{uuid.uuid4().hex}"
    producer, consumer = client(service_settings, "p"), client(service_settings, "c")
    try:
        for i in range(3):
            producer.publish(dest, f'{{"n": {i}}}')
        box = collect(consumer, dest)
        first = box.get(timeout=10)
        assert first.body == b'{"n": 0}'
        assert first.headers["persistent"] == "true"
        time.sleep(0.5)
        assert box.empty(), "prefetch 1: nothing more until the first is acknowledged"
        consumer.ack(first)
        assert box.get(timeout=10).body == b'{"n": 1}'
    finally:
        producer.close()
        consumer.close()


def test_unacknowledged_message_is_redelivered(service_settings: ServiceSettings) -> None:
    dest = f"/queue/test.{uuid.uuid4().hex}"
    producer = client(service_settings, "p")
    producer.publish(dest, '{"n": 1}')
    first = client(service_settings, "c1")
    got = collect(first, dest).get(timeout=10)
    first.close()  # dies without acknowledging
    second = client(service_settings, "c2")
    try:
        again = collect(second, dest).get(timeout=10)
        assert again.body == got.body
        assert again.redelivered
        assert second.ack(again)
    finally:
        second.close()
        producer.close()


def test_nack_sends_to_the_queues_dead_letter_queue(service_settings: ServiceSettings) -> None:
    dest = f"/queue/test.{uuid.uuid4().hex}"
    c = client(service_settings, "c")
    try:
        c.publish(dest, '{"poison": true}')
        c.nack(collect(c, dest).get(timeout=10))
        dead = collect(c, dead_letter_queue(dest)).get(timeout=10)
        assert dead.body == b'{"poison": true}'
        c.ack(dead)
    finally:
        c.close()


def test_hub_dead_letters_and_audits_malformed_results(federation: LocalFederation,
                                                       service_settings: ServiceSettings) -> None:
    c = client(service_settings, "intruder")
    marker = uuid.uuid4().hex
    results = results_queue(federation.federation)  # the queue this federation's hub reads
    try:
        c.publish(results, f'{{"kind": "result", "garbage": "{marker}"}}')
        c.publish(results, "x" * (3 * 1024 * 1024))
        dlq = collect(c, dead_letter_queue(results))
        seen = []
        deadline = time.monotonic() + 30
        while len(seen) < 2 and time.monotonic() < deadline:
            try:
                delivery = dlq.get(timeout=1)
            except queue.Empty:
                continue
            c.ack(delivery)
            if marker.encode() in delivery.body or len(delivery.body) > 1_000_000:
                seen.append(delivery)
        assert len(seen) == 2
    finally:
        c.close()
    with federation.api() as api:
        rejected = api.get("/api/audit", params={"action": "message.rejected"}).json()
    reasons = " | ".join(r["detail"]["reason"] for r in rejected)
    assert "unsigned message" in reasons
    assert "exceeds" in reasons
