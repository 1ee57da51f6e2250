"""The progress channel cannot carry data: an algorithm that tries to stream what it read
through progress.json gets a rounded fraction and a word of a fixed vocabulary out, at most
:data:`MAX_PROGRESS_REPORTS_PER_CASE` times per case, each audited on the spoke and at the
hub, and nothing at all when the site's steward reviews results. Messages really cross the
broker."""

from __future__ import annotations

import json
import queue
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from signed_results import keys, session  # noqa: F401 - fixtures
from sqlmodel import Session, select

from tributary.hub.models import AuditEvent
from tributary.hub.services.ingest import ingest
from tributary.protocol.broker import BrokerSettings, Delivery, StompClient
from tributary.protocol.contract import (
    MAX_PROGRESS_REPORTS_PER_CASE,
    PROGRESS_FRACTION_STEP,
    Progress,
    ProgressStep,
)
from tributary.protocol.messages import (
    CaseProgressMessage,
    CaseStartedMessage,
    HeartbeatMessage,
    RunningCase,
)
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import open_from_spoke
from tributary.services.settings import ServiceSettings
from tributary.spoke.liveness import CaseActivity, ProgressReporter
from tributary.spoke.runner import read_progress

SECRET = "DOE^JANE 1970-01-01 MRN 123456"


def test_progress_file_admits_only_the_vocabulary(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    path.write_text(json.dumps({"fraction": 0.5, "message": SECRET}))
    assert read_progress(path) is None  # free text: the whole file is ignored
    path.write_text(json.dumps({"fraction": 0.5, "message": "measuring"}))
    assert read_progress(path) == Progress(fraction=0.5, message=ProgressStep.MEASURING)


def test_fraction_is_rounded_everywhere_it_leaves() -> None:
    """A fraction cannot hide digits: it is rounded in the file model and in both
    messages, so even a hand-made message carries one of 21 values."""
    fine = 0.123456789
    assert Progress(fraction=fine).fraction == 0.1
    assert CaseProgressMessage(experiment_id="e", spoke_id="site-a", case_id="c",
                               fraction=fine).fraction == 0.1
    running = RunningCase(experiment_id="e", case_id="c", started_at=datetime.now(UTC),
                          fraction=0.987)
    assert running.fraction == 1.0
    values = {Progress(fraction=i / 1000).fraction for i in range(1001)}
    assert len(values) == round(1 / PROGRESS_FRACTION_STEP) + 1
    with pytest.raises(ValidationError):
        CaseProgressMessage(experiment_id="e", spoke_id="site-a", case_id="c", fraction=0.5,
                            message=SECRET)


def _client(settings: ServiceSettings) -> StompClient:
    return StompClient(BrokerSettings(host=settings.host, port=settings.broker_port),
                       f"progress-{uuid.uuid4().hex[:6]}").start(wait=30)


def _drain(client: StompClient, box: queue.Queue[Delivery], key: SigningKey,
           quiet: float = 2.0) -> list[CaseProgressMessage]:
    got = []
    while True:
        try:
            delivery = box.get(timeout=quiet)
        except queue.Empty:
            return got
        client.ack(delivery)
        message, _ = open_from_spoke(delivery.body, lambda _id: ("site-a", key.public))
        assert isinstance(message, CaseProgressMessage)
        got.append(message)


@pytest.mark.e2e
def test_an_algorithm_streaming_progress_gets_little_out(service_settings: ServiceSettings
                                                        ) -> None:
    """Hundreds of distinct progress values: what crosses the broker is capped per case,
    rounded, from the vocabulary, and each message was audited before it left; heartbeats
    repeat the last message sent, never anything newer."""
    destination = f"/queue/test.progress.{uuid.uuid4().hex}"
    key = SigningKey.generate()
    sender, receiver = _client(service_settings), _client(service_settings)
    box: queue.Queue[Delivery] = queue.Queue()
    receiver.subscribe(destination, box.put)
    audited: list[CaseProgressMessage] = []
    reporter = ProgressReporter(sender, destination, key, "site-a", interval=0.0,
                                audit=lambda _activity, message: audited.append(message))
    activity = CaseActivity("exp-1", "c-1", 1, datetime.now(UTC))
    steps = list(ProgressStep)
    try:
        for i in range(300):  # an algorithm rewriting progress.json with ever new values
            reporter.report(activity, Progress(fraction=(i % 100) / 100,
                                               message=steps[i % len(steps)]))
        got = _drain(receiver, box, key)
    finally:
        sender.close()
        receiver.close()
    assert len(got) == MAX_PROGRESS_REPORTS_PER_CASE
    assert [m.message_id for m in got] == [m.message_id for m in audited]
    assert all(round(m.fraction / PROGRESS_FRACTION_STEP, 6).is_integer() for m in got)
    assert all(m.message in steps for m in got)
    last = got[-1]
    beat = activity.as_running()
    assert (beat.fraction, beat.message) == (last.fraction, last.message)


@pytest.mark.e2e
def test_nothing_of_progress_leaves_when_results_are_reviewed(
        service_settings: ServiceSettings) -> None:
    destination = f"/queue/test.progress.{uuid.uuid4().hex}"
    key = SigningKey.generate()
    sender, receiver = _client(service_settings), _client(service_settings)
    box: queue.Queue[Delivery] = queue.Queue()
    receiver.subscribe(destination, box.put)
    audited: list[Any] = []
    reporter = ProgressReporter(sender, destination, key, "site-a", interval=0.0,
                                audit=lambda *args: audited.append(args), enabled=False)
    activity = CaseActivity("exp-1", "c-1", 1, datetime.now(UTC))
    try:
        for i in range(20):
            reporter.report(activity, Progress(fraction=i / 20, message=ProgressStep.LOADING))
        time.sleep(0.5)
        got = _drain(receiver, box, key, quiet=1.5)
    finally:
        sender.close()
        receiver.close()
    assert got == [] and audited == []
    running = activity.as_running()  # the heartbeat says the case runs, nothing more
    assert running.fraction is None and running.message is None
    HeartbeatMessage(spoke_id="site-a", spoke_version="t", concurrency=1, queue_depth=0,
                     running=[running], interval_seconds=30)


def test_hub_audits_every_progress_message(session: Session) -> None:  # noqa: F811
    ingest(session, CaseStartedMessage(experiment_id="exp-1", spoke_id="site-a",
                                       case_id="c-1"))
    first = CaseProgressMessage(experiment_id="exp-1", spoke_id="site-a", case_id="c-1",
                                fraction=0.3, message=ProgressStep.LOADING)
    assert ingest(session, first)
    other_attempt = CaseProgressMessage(experiment_id="exp-1", spoke_id="site-a",
                                        case_id="c-1", attempt=7, fraction=0.6)
    assert not ingest(session, other_attempt)  # not applied, audited all the same
    events = session.exec(select(AuditEvent).where(
        AuditEvent.action == "progress.received")).all()
    assert [(e.detail["message_id"], e.detail["fraction"], e.detail["step"],
             e.detail["applied"]) for e in events] == [
        (first.message_id, 0.3, "loading", True), (other_attempt.message_id, 0.6, None, False)]


@pytest.mark.e2e
def test_a_reviewing_spoke_sends_no_progress(tmp_path: Path, service_settings: ServiceSettings,
                                             misbehaving_image: tuple[str, str]) -> None:
    """A real spoke whose steward reviews results runs an algorithm that reports progress
    twice a second: heartbeats say the case runs, and not one progress message or
    progress value crosses the broker."""
    from test_spoke_durability_e2e import (
        HubListener,
        add_spoke,
        audit_entries,
        hub_publish,
        wait_for,
    )

    from tributary.protocol.messages import AlgorithmRef, ExperimentMessage, RunLimits
    from tributary.protocol.release import sign_approval
    from tributary.testbed.federation import LocalFederation

    federation = LocalFederation(tmp_path / "fed", service_settings)
    hub_key = SigningKey.load_or_create(federation.hub_key_path)
    spoke_id, config = add_spoke(federation, "review", cases=1, concurrency=1,
                                 liveness="heartbeat_seconds = 1\nprogress_seconds = 0.5")
    config.write_text(config.read_text() + "\n[steward]\nreview_results = true\n")
    listener = HubListener(federation, spoke_id,
                           SigningKey.load_or_create(config.parent / "spoke.key"))
    repository, digest = misbehaving_image
    experiment = ExperimentMessage(
        experiment_id=f"exp-{uuid.uuid4().hex[:8]}", spoke_id=spoke_id,
        algorithm=AlgorithmRef(name="misbehaving", version="1", repository=repository,
                               digest=digest, approval=sign_approval(
                                   hub_key, repository, digest, {"name": "misbehaving"})),
        arguments={"behaviour": "slow", "seconds": 6},
        limits=RunLimits(timeout_seconds=120, memory_mb=256))
    try:
        federation.start_spoke(spoke_id, config)
        hub_publish(federation, experiment)
        first = wait_for(lambda: [h for h in listener.of(HeartbeatMessage) if h.running],
                         120, "heartbeat with the running case")[0]
        wait_for(lambda: audit_entries(config, "steward.result_held"), 60, "held result")
        beats = [h for h in listener.of(HeartbeatMessage) if h.sent_at >= first.sent_at]
        assert len([h for h in beats if h.running]) >= 3  # seen running for seconds
        assert all(r.fraction is None and r.message is None for h in beats for r in h.running)
        assert listener.of(CaseProgressMessage) == []
        assert audit_entries(config, "progress.sent") == []
    finally:
        federation.stop()
        listener.close()
