"""The results consumer stores what crosses the real broker in batches: a backlog with
hostile messages in it is stored, the hostile ones dead-lettered alone with their reasons;
a result that arrives before the record it follows (competing consumers, a spoke from before
message groups) is held a few seconds and stored once its predecessor is, with no resend
request; one whose predecessor never comes is dead-lettered as a custody gap after the
hold."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from e2e_helpers import wait_for
from signed_results import DIGEST, Spokes, accept, add_experiment
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from tributary.hub.consumer import HELD_RETRY_SECONDS, ResultsConsumer
from tributary.hub.db import open_database
from tributary.hub.models import (
    AuditEvent,
    CaseAttempt,
    CustodyGap,
    GapState,
    QuarantinedMessage,
)
from tributary.hub.settings import HubSettings
from tributary.protocol.auditlog import verify_log
from tributary.protocol.broker import StompClient
from tributary.protocol.destinations import results_queue
from tributary.protocol.messages import CaseStatus, ResultMessage
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal
from tributary.services.settings import ServiceSettings

pytestmark = pytest.mark.e2e

CASES = [f"c{i:02d}" for i in range(20)]


class Hub:
    """A hub database, its consumer in this process, and a client publishing as spokes."""

    def __init__(self, tmp_path: Path, service_settings: ServiceSettings, unique: str,
                 **overrides: object) -> None:
        self.settings = HubSettings.for_directory(
            tmp_path, signing_key=tmp_path / "hub.key", audit_log=tmp_path / "audit.jsonl",
            broker_host=service_settings.host, broker_port=service_settings.broker_port,
            broker_federation=f"t-batches-{unique}", **overrides)
        self.engine: Engine = open_database(self.settings)
        with Session(self.engine) as session:
            self.spokes = Spokes(session, ["north", "south"])
            add_experiment(session, "exp", ["north", "south"], "summary", {})
            for spoke in ("north", "south"):
                accept(session, "exp", spoke, CASES)
        self.publisher = StompClient(self.settings.broker(), "spokes").start(30)
        self.queue = results_queue(self.settings.broker_federation)
        self.client: StompClient | None = None
        self.consumer: ResultsConsumer | None = None

    def start(self) -> None:
        self.client = StompClient(self.settings.broker(), "hub").start(30)
        key = SigningKey.load_or_create(self.settings.signing_key)
        self.consumer = ResultsConsumer(self.engine, self.client, key, self.settings).start()

    def result(self, spoke: str, case: str) -> ResultMessage:
        return self.spokes.sign(ResultMessage(
            experiment_id="exp", spoke_id=spoke, case_id=case, status=CaseStatus.SUCCEEDED,
            output={"volume": 1.0}, image_digest=DIGEST, finished_at=datetime.now(UTC)))

    def publish(self, message: ResultMessage | str) -> None:
        body = message if isinstance(message, str) else seal(message,
                                                             self.spokes.keys[message.spoke_id])
        self.publisher.publish(self.queue, body)

    def count(self, model: type, *where: object) -> int:
        with Session(self.engine) as session:
            return session.exec(select(func.count()).select_from(model).where(*where)).one()

    def audit(self, action: str) -> list[AuditEvent]:
        with Session(self.engine) as session:
            return list(session.exec(select(AuditEvent).where(AuditEvent.action == action)))

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()
        for client in (self.client, self.publisher):
            if client is not None:
                client.close()
        self.engine.dispose()


@pytest.fixture
def hub(tmp_path: Path, service_settings: ServiceSettings, unique: str) -> Iterator[Hub]:
    hub = Hub(tmp_path, service_settings, unique)
    yield hub
    hub.close()


def test_a_backlog_is_stored_in_batches_and_hostile_messages_go_alone(
        hub: Hub, tmp_path: Path) -> None:
    results = [hub.result(spoke, case) for case in CASES for spoke in ("north", "south")]
    replayed = results[0].model_copy(update={"message_id": "replayed", "case_id": "c19"})
    stranger = SigningKey.generate()
    hostile = ["not json at all",
               seal(results[1].model_copy(update={"message_id": "unknown-key"}), stranger),
               seal(replayed, hub.spokes.keys["north"])]
    for index, message in enumerate(results):  # the hostile ones in the middle of the stream
        hub.publish(message)
        if index in (5, 17, 30):
            hub.publish(hostile.pop(0))
    hub.start()  # the whole backlog is waiting: the consumer takes it in batches

    wait_for(lambda: hub.count(CaseAttempt) == len(results), 60, "every good result stored")
    wait_for(lambda: hub.count(QuarantinedMessage) == 3, 30, "the hostile messages refused")
    with Session(hub.engine) as session:
        reasons = sorted(q.reason for q in session.exec(select(QuarantinedMessage)))
    assert any("not JSON" in r or "malformed" in r for r in reasons), reasons
    assert any("not an active enrolled key" in r for r in reasons), reasons
    assert any("custody record refused" in r for r in reasons), reasons
    received = [e for e in hub.audit("message.received") if e.detail.get("kind") == "result"]
    assert len(received) == len(results)
    assert len(hub.audit("message.rejected")) == 3
    assert verify_log(hub.settings.audit_log).ok  # type: ignore[arg-type]
    # Every message was acknowledged (or dead-lettered): nothing comes back on a new consumer.
    assert hub.consumer is not None
    hub.consumer.stop()
    assert hub.client is not None
    hub.client.close()
    hub.consumer = None
    leftovers: list[str] = []
    drain = StompClient(hub.settings.broker(), "drain").start(30)
    try:
        drain.subscribe(hub.queue, lambda d: leftovers.append(d.message_id))
        time.sleep(2)
    finally:
        drain.close()
    assert leftovers == []


def test_a_result_ahead_of_its_predecessor_is_held_until_it_arrives(hub: Hub) -> None:
    first, second, third = (hub.result("north", case) for case in CASES[:3])
    hub.start()
    hub.publish(second)
    hub.publish(third)
    wait_for(lambda: hub.count(CustodyGap) == 1, 30, "the gap noticed")
    assert hub.consumer is not None
    before = hub.consumer.batches
    time.sleep(1)  # the predecessor comes later, as from another consumer's hands
    # Held results are tried again at a pace (HELD_RETRY_SECONDS), not in a busy loop.
    assert hub.consumer.batches - before <= 1 / HELD_RETRY_SECONDS + 2
    assert hub.count(CaseAttempt) == 0
    hub.publish(first)

    wait_for(lambda: hub.count(CaseAttempt) == 3, 30, "all three stored once the first came")
    assert hub.count(QuarantinedMessage) == 0
    assert hub.audit("message.rejected") == []
    with Session(hub.engine) as session:
        gap = session.exec(select(CustodyGap)).one()
    assert (gap.first_missing, gap.state) == (1, GapState.RESOLVED.value)
    assert gap.resend_requests == 0  # no resend asked for a gap closed within the hold
    assert hub.audit("custody.resend_requested") == []


def test_a_gap_that_stays_open_is_dead_lettered_after_the_hold(
        tmp_path: Path, service_settings: ServiceSettings, unique: str) -> None:
    hub = Hub(tmp_path, service_settings, unique, custody_gap_hold_seconds=1.0)
    try:
        hub.result("north", CASES[0])  # record 1, never sent
        second = hub.result("north", CASES[1])
        hub.start()
        started = time.monotonic()
        hub.publish(second)
        wait_for(lambda: hub.count(QuarantinedMessage) == 1, 30, "the result dead-lettered")
        assert time.monotonic() - started >= 1.0, "held for the hold before refusing it"
        with Session(hub.engine) as session:
            refused = session.exec(select(QuarantinedMessage)).one()
            gap = session.exec(select(CustodyGap)).one()
        assert "custody chain gap" in refused.reason
        assert json.loads(refused.body)["signatures"]
        assert (gap.first_missing, gap.last_missing, gap.state) == (1, 1, GapState.OPEN.value)
        wait_for(lambda: hub.audit("custody.resend_requested"), 30,
                 "the spoke asked to resend the missing record")
    finally:
        hub.close()


def test_the_next_batches_arrive_while_one_is_stored(
        tmp_path: Path, service_settings: ServiceSettings, unique: str) -> None:
    """The broker's prefetch is several batches: while a batch waits on the database, the
    following ones are already delivered (with a prefetch of one batch, the broker sent
    nothing more until the batch was acknowledged, and the consumer idled between batches)."""
    # Opening in the consuming thread: with verifying processes the consumer also takes the
    # next batch ahead (when it has arrived by then), and fewer would wait in its inbox.
    hub = Hub(tmp_path, service_settings, unique, results_batch_size=4,
              results_prefetch_batches=3, results_batch_wait_ms=500,
              results_verify_processes=0)
    try:
        results = [hub.result(spoke, case) for case in CASES for spoke in ("north", "south")]
        for message in results:
            hub.publish(message)
        with hub.engine.connect() as blocker:  # another writer holds the database
            blocker.exec_driver_sql("BEGIN IMMEDIATE")
            hub.start()
            assert hub.consumer is not None
            consumer = hub.consumer
            # One batch of 4 is taken and waits for the lock; 8 more are delivered to it.
            wait_for(lambda: consumer.waiting() == 8, 20, "two more batches delivered")
            time.sleep(1.0)
            assert consumer.waiting() == 8  # and no more than the prefetch
            assert hub.count(CaseAttempt) == 0
            blocker.exec_driver_sql("ROLLBACK")
        wait_for(lambda: hub.count(CaseAttempt) == len(results), 60, "every result stored")
        assert hub.count(QuarantinedMessage) == 0
    finally:
        hub.close()
