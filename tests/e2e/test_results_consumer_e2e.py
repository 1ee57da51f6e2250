"""The results consumer runs as a process of its own (``tributary.hub.consumer.run``), apart
from the web app: a signed result crossing the real broker is stored and aggregated by it,
and it stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from e2e_helpers import wait_for
from signed_results import DIGEST, Spokes, accept, add_experiment
from sqlmodel import Session, select

from tributary.hub.db import open_database
from tributary.hub.models import AggregateSnapshot, AuditEvent, CaseResult, CaseState
from tributary.hub.settings import HubSettings
from tributary.protocol.broker import StompClient
from tributary.protocol.destinations import results_queue
from tributary.protocol.messages import CaseStatus, ResultMessage
from tributary.protocol.wire import seal
from tributary.services.settings import ServiceSettings

pytestmark = pytest.mark.e2e


def test_consumer_on_its_own_stores_a_result_from_the_broker(
        tmp_path: Path, service_settings: ServiceSettings, unique: str) -> None:
    settings = HubSettings.for_directory(
        tmp_path, signing_key=tmp_path / "hub.key", audit_log=tmp_path / "audit.jsonl",
        broker_host=service_settings.host, broker_port=service_settings.broker_port,
        broker_federation=f"t-consumer-{unique}")
    engine = open_database(settings)
    with Session(engine) as session:
        spokes = Spokes(session, ["north"])
        add_experiment(session, "exp", ["north"], "summary", {})
        accept(session, "exp", "north", ["c1"])
    result = spokes.sign(ResultMessage(
        experiment_id="exp", spoke_id="north", case_id="c1", status=CaseStatus.SUCCEEDED,
        output={"volume": 4.2}, image_digest=DIGEST, finished_at=datetime.now(UTC)))

    env = {**os.environ, "TRIBUTARY_HUB_DATABASE_URL": settings.database_url,
           "TRIBUTARY_HUB_SIGNING_KEY": str(settings.signing_key),
           "TRIBUTARY_HUB_AUDIT_LOG": str(settings.audit_log),
           "TRIBUTARY_HUB_BROKER_HOST": settings.broker_host,
           "TRIBUTARY_HUB_BROKER_PORT": str(settings.broker_port),
           "TRIBUTARY_HUB_BROKER_FEDERATION": settings.broker_federation}
    env.pop("TRIBUTARY_HUB_CELERY_BROKER_URL", None)  # aggregation in the consumer's process
    consumer = subprocess.Popen(
        [sys.executable, "-m", "tributary.cli", "hub", "consume"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = StompClient(settings.broker(), "consumer-test").start(30)
        try:
            client.publish(results_queue(settings.broker_federation),
                           seal(result, spokes.keys["north"]))
        finally:
            client.close()

        def stored() -> CaseResult | None:
            with Session(engine) as session:
                row = session.exec(select(CaseResult).where(
                    CaseResult.experiment_id == "exp", CaseResult.case_id == "c1")).one()
                return row if row.state == CaseState.SUCCEEDED else None

        row = wait_for(stored, 60, "the result stored by the consumer process")
        assert row.output == {"volume": 4.2} and row.result_message_id == result.message_id
        with Session(engine) as session:
            assert session.exec(select(AuditEvent).where(
                AuditEvent.action == "message.received",
                AuditEvent.target == "exp")).first() is not None

        def aggregated() -> AggregateSnapshot | None:  # by the consumer's debouncer, off-thread
            with Session(engine) as session:
                return session.exec(select(AggregateSnapshot).where(
                    AggregateSnapshot.experiment_id == "exp")).first()

        snapshot = wait_for(aggregated, 30, "the aggregate computed in the consumer's process")
        assert snapshot.results == 1
        assert consumer.poll() is None, "the consumer keeps running between messages"
    finally:
        consumer.send_signal(signal.SIGTERM)
        output, _ = consumer.communicate(timeout=30)
    assert consumer.returncode == 0, output
