"""Whatever lands in a spoke's queue, the spoke goes on: bytes that are not a message, ids
that would name a path outside the spoke's folders, and a fault while handling a good
message all end in the queue's dead-letter queue with an audited reason, never in a spoke
process that exits (and exits again on the same message at every restart)."""

from __future__ import annotations

import json
import queue
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import running_site, wait_for

from tributary.protocol.broker import BrokerSettings, Delivery, StompClient
from tributary.protocol.destinations import dead_letter_queue, results_queue, spoke_queue
from tributary.protocol.messages import (
    AlgorithmRef,
    CancelExperimentMessage,
    CountRequest,
    ExperimentMessage,
    RetryCasesMessage,
    encode,
)
from tributary.protocol.signing import MESSAGE_PAYLOAD_TYPE, SigningKey, sha256_hex
from tributary.protocol.wire import seal
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def site(federation: LocalFederation, misbehaving_image: tuple[str, str],
         service_settings: ServiceSettings) -> Iterator[dict[str, Any]]:
    spoke_id, config, algorithm = running_site(federation, misbehaving_image, "poison", 21,
                                               "Poisoned Hospital")
    client = StompClient(BrokerSettings(host=service_settings.host,
                                        port=service_settings.broker_port,
                                        federation=federation.federation), "poisoner")
    client.start(wait=30)
    inbox = spoke_queue(spoke_id, federation.federation)
    dead: queue.Queue[Delivery] = queue.Queue()
    client.subscribe(dead_letter_queue(inbox), dead.put)
    yield {"id": spoke_id, "config": config, "client": client, "queue": inbox, "dead": dead,
           "algorithm": algorithm, "image": misbehaving_image,
           "process": federation.processes[f"spoke-{spoke_id}"]}
    client.close()


def dead_letters(site: dict[str, Any], count: int, timeout: float = 60) -> list[bytes]:
    """The next ``count`` bodies in the spoke's dead-letter queue; fails at once should the
    spoke process exit meanwhile."""
    bodies: list[bytes] = []
    while len(bodies) < count:
        try:
            delivery = site["dead"].get(timeout=0.5)
        except queue.Empty:
            assert site["process"].alive(), f"the spoke exited:\n{site['process'].log_tail()}"
            timeout -= 0.5
            assert timeout > 0, f"only {len(bodies)} of {count} messages were dead-lettered"
            continue
        site["client"].ack(delivery)
        bodies.append(delivery.body)
    return bodies


def audit(site: dict[str, Any], action: str) -> list[dict[str, Any]]:
    lines = (Path(site["config"]).parent / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["action"] == action]


def dead_letter_reasons(site: dict[str, Any], bodies: list[bytes]) -> dict[bytes, str]:
    """The audited reason each body was dead-lettered for, found by its hash."""
    by_hash = {sha256_hex(b): b for b in bodies}
    received = {e["detail"]["message_id"]: by_hash[e["detail"]["sha256"]]
                for e in audit(site, "message.received") if e["detail"]["sha256"] in by_hash}
    return {received[e["detail"]["message_id"]]: e["detail"]["reason"]
            for e in audit(site, "message.dead_lettered")
            if e["detail"]["message_id"] in received}


def count_answered(federation: LocalFederation, site: dict[str, Any]) -> dict[str, Any]:
    """A good message after the bad ones: a count query through the hub, answered."""
    with federation.api() as api:
        query = api.post("/api/counts", json={"selection": {"modality": "CT"},
                                              "spoke_ids": [site["id"]]}).raise_for_status()
        return wait_for(lambda: (c := api.get(f"/api/counts/{query.json()['id']}").json())
                        ["complete"] and c, 90, "count answered")


def signed_raw(federation: LocalFederation, body: dict[str, Any]) -> str:
    """Sign with the hub's key a message body the protocol models would refuse to build."""
    hub_key = SigningKey.load(federation.hub_key_path)
    return json.dumps(hub_key.sign(json.dumps(body).encode(), MESSAGE_PAYLOAD_TYPE))


def test_bytes_that_are_no_message_are_dead_lettered_and_the_spoke_goes_on(
        federation: LocalFederation, site: dict[str, Any]) -> None:
    poison = [b'{"payload": 1, "payloadType": "x", "signatures": []}', b"[" * 50_000]
    assert len(poison[0]) == 52
    for body in poison:
        site["client"].publish(site["queue"], body.decode())
    assert sorted(dead_letters(site, 2)) == sorted(poison)
    reasons = wait_for(lambda: len(r := dead_letter_reasons(site, poison)) == 2 and r, 10,
                       "audited reasons")
    assert all("unreadable" in reason for reason in reasons.values()), reasons
    assert count_answered(federation, site)["spokes"][0]["state"] == "answered"
    assert site["process"].alive()


def test_ids_that_would_name_a_path_are_dead_lettered_and_nothing_is_written(
        federation: LocalFederation, site: dict[str, Any]) -> None:
    escape = f"escaped-{uuid.uuid4().hex[:8]}"
    repository, digest = site["image"]
    experiment = json.loads(encode(ExperimentMessage(
        experiment_id="exp-placeholder", spoke_id=site["id"], arguments={"behaviour": "ok"},
        algorithm=AlgorithmRef(name="ok", version="1", repository=repository, digest=digest,
                               approval=site["algorithm"]["approval"]))))
    count = json.loads(encode(CountRequest(query_id="cnt-placeholder", spoke_id=site["id"])))
    retry = json.loads(encode(RetryCasesMessage(experiment_id="exp-placeholder",
                                                spoke_id=site["id"], case_ids=["c-1"],
                                                attempt=2)))
    hostile = [{**experiment, "experiment_id": f"../../{escape}"},
               {**count, "query_id": f"../{escape}"},
               {**retry, "case_ids": [f"../../{escape}"]},
               {**count, "message_id": f"../{escape}"}]
    bodies = [signed_raw(federation, body).encode() for body in hostile]
    watch = federation.watch_containers(f"org.tributary.spoke={site['id']}")
    for body in bodies:
        site["client"].publish(site["queue"], body.decode())
    assert sorted(dead_letters(site, len(bodies), timeout=30)) == sorted(bodies)
    reasons = wait_for(lambda: len(r := dead_letter_reasons(site, bodies)) == 4 and r, 10,
                       "audited reasons")
    for body, field in zip(bodies, ("experiment_id", "query_id", "case_ids", "message_id"),
                           strict=True):
        assert field in reasons[body], reasons[body]
    assert watch.stop() == []
    assert not [p for p in federation.root.rglob(f"*{escape}*")]
    assert site["process"].alive()


def test_a_fault_while_handling_dead_letters_after_bounded_retries(
        federation: LocalFederation, site: dict[str, Any]) -> None:
    """Not the message's fault: the spoke's journal cannot be written (held by another
    process). The spoke tries a few times, then dead-letters the message with the fault as
    reason, rather than exit or retry forever; an operator can replay it from the DLQ."""
    cancel = seal(CancelExperimentMessage(experiment_id=f"exp-{uuid.uuid4().hex[:12]}",
                                          spoke_id=site["id"], reason="poison test"),
                  SigningKey.load(federation.hub_key_path))
    journal = sqlite3.connect(Path(site["config"]).parent / "journal.db",
                              isolation_level=None)
    try:
        journal.execute("BEGIN IMMEDIATE")  # holds the write lock until released
        site["client"].publish(site["queue"], cancel)
        assert dead_letters(site, 1, timeout=90) == [cancel.encode()]
    finally:
        journal.execute("ROLLBACK")
        journal.close()
    (reason,) = dead_letter_reasons(site, [cancel.encode()]).values()
    assert "attempts" in reason and "locked" in reason, reason
    assert count_answered(federation, site)["spokes"][0]["state"] == "answered"


def test_the_hub_dead_letters_the_same_bytes_and_goes_on(
        federation: LocalFederation, site: dict[str, Any]) -> None:
    marker = uuid.uuid4().hex[:8]
    poison = [f'{{"payload": 1, "payloadType": "{marker}", "signatures": []}}',
              "[" * 50_000 + marker]
    for body in poison:
        site["client"].publish(results_queue(federation.federation), body)

    def quarantined() -> list[dict[str, Any]]:
        with federation.api() as api:
            items = api.get("/api/quarantine", params={"limit": 5000}).json()
        return [i for i in items if marker in i["body"]]

    items = wait_for(lambda: len(q := quarantined()) == 2 and q, 60, "two quarantined")
    assert all(i["reason"].startswith(("unsigned message", "malformed message"))
               for i in items), [i["reason"] for i in items]
    assert federation.processes["hub"].alive()
    with federation.api() as api:
        assert api.get("/api/health").status_code == 200
