"""Simulated spokes for load tests: they speak the real protocol through the real broker
(their own Ed25519 key enrolled at the hub, a custody chain per spoke, signed messages) but
run no containers and read no images. A simulated spoke reads its experiment message from
its queue and verifies the hub's signature as a spoke does, accepts a made-up case list,
and publishes one signed result per case, each with its custody record, plus heartbeats.

The messages are built apart from being sent (:meth:`SimSpoke.result` returns the sealed
body) so that a benchmark can time the broker and the hub's ingestion separately."""

from __future__ import annotations

import queue
from datetime import UTC, datetime
from typing import Any

from tributary.protocol.broker import Delivery, StompClient
from tributary.protocol.custody import GENESIS, CustodyRecord, record_hash, sign_custody
from tributary.protocol.destinations import results_queue, spoke_queue
from tributary.protocol.messages import (
    CaseStatus,
    ExperimentMessage,
    ExperimentStatusMessage,
    HeartbeatMessage,
    ResultMessage,
)
from tributary.protocol.messages import ExperimentState as SpokeState
from tributary.protocol.signing import PublicKey, SigningKey
from tributary.protocol.wire import open_from_hub, seal

VERSION = "simulated"


class SimSpoke:
    """One simulated spoke: its identity, key and custody chain head."""

    def __init__(self, spoke_id: str, key: SigningKey | None = None) -> None:
        self.spoke_id = spoke_id
        self.key = key or SigningKey.generate()
        self.sequence, self.head = 0, GENESIS

    def receive_experiment(self, client: StompClient, hub_keys: list[PublicKey],
                           timeout: float = 30) -> ExperimentMessage:
        """The next experiment message on this spoke's queue, verified and acknowledged
        (other hub messages are acknowledged and skipped)."""
        arrived: queue.Queue[Delivery] = queue.Queue()
        destination = spoke_queue(self.spoke_id, client.settings.federation)
        client.subscribe(destination, arrived.put)
        while True:
            delivery = arrived.get(timeout=timeout)
            message = open_from_hub(delivery.body, hub_keys)
            client.ack(delivery)
            if isinstance(message, ExperimentMessage) and message.spoke_id == self.spoke_id:
                return message

    def status(self, experiment_id: str, state: SpokeState,
               case_ids: list[str] | None = None) -> str:
        return seal(ExperimentStatusMessage(experiment_id=experiment_id, spoke_id=self.spoke_id,
                                            state=state, case_ids=case_ids or []), self.key)

    def heartbeat(self, queue_depth: int = 0) -> str:
        return seal(HeartbeatMessage(spoke_id=self.spoke_id, spoke_version=VERSION,
                                     concurrency=1, queue_depth=queue_depth,
                                     interval_seconds=30), self.key)

    def result(self, experiment_id: str, case_id: str, digest: str,
               output: dict[str, Any] | None, released: dict[str, Any] | None = None) -> str:
        """A signed result with the next custody record of this spoke's chain."""
        now = datetime.now(UTC)
        result = ResultMessage(experiment_id=experiment_id, spoke_id=self.spoke_id,
                               case_id=case_id, status=CaseStatus.SUCCEEDED, output=output,
                               released=released or {}, image_digest=digest,
                               started_at=now, finished_at=now)
        record = CustodyRecord(
            experiment_id=experiment_id, spoke_id=self.spoke_id, case_id=case_id,
            attempt=result.attempt, sequence=self.sequence + 1,
            previous_record_sha256=self.head, image_digest=digest,
            participant_sha256="1" * 64, input_sha256="2" * 64, deid_profile="simulated",
            spoke_version=VERSION, started_at=now, finished_at=now,
            status=result.status.value, exit_code=0, failure_reason=None)
        envelope = sign_custody(self.key, record, result)
        self.sequence, self.head = self.sequence + 1, record_hash(envelope)
        return seal(result.model_copy(update={"custody": envelope}), self.key)


def publish_results(client: StompClient, bodies: list[str]) -> None:
    """Send sealed spoke messages to the hub's results queue (persistent, confirmed)."""
    destination = results_queue(client.settings.federation)
    for body in bodies:
        client.publish(destination, body)
