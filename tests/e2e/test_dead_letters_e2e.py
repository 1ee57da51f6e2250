"""Poison messages end in the dead-letter queue with a visible reason while the hub goes
on with the others; an operator lists, replays and discards dead letters with
``tributary dlq``, and every action lands in the hub's audit trail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any
from urllib.parse import quote

import pytest
from e2e_helpers import wait_for

from tributary.protocol import deadletters
from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.destinations import results_queue, spoke_queue
from tributary.protocol.messages import HeartbeatMessage
from tributary.protocol.signing import MESSAGE_PAYLOAD_TYPE, SigningKey
from tributary.protocol.wire import seal
from tributary.testbed.federation import LocalFederation

pytestmark = pytest.mark.e2e


def heartbeat(spoke_id: str, queue_depth: int) -> HeartbeatMessage:
    return HeartbeatMessage(spoke_id=spoke_id, spoke_version="test", concurrency=1,
                            queue_depth=queue_depth, interval_seconds=30)


def dlq_cli(federation: LocalFederation, *args: str) -> str:
    env = {**os.environ, **federation._hub_broker_env(),
           "TRIBUTARY_HUB_DATABASE_URL": f"sqlite:///{federation.root / 'hub.db'}",
           "TRIBUTARY_HUB_AUDIT_LOG": str(federation.hub_audit_log), "COLUMNS": "250"}
    done = subprocess.run([sys.executable, "-m", "tributary.cli", "dlq", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_poison_messages_are_dead_lettered_visibly_and_can_be_replayed_or_discarded(
        federation: LocalFederation, unique: str) -> None:
    spoke_id = f"dl-{unique}"
    known, later = SigningKey.generate(), SigningKey.generate()
    with federation.api() as api:
        api.post("/api/spokes", json={"id": spoke_id, "name": "DLQ site"}).raise_for_status()
        api.post(f"/api/spokes/{spoke_id}/keys",
                 json={"public_key_pem": known.public.pem}).raise_for_status()
    future = json.loads(heartbeat(spoke_id, 1).model_dump_json())
    future["protocol_version"] = "2.0"
    client = StompClient(BrokerSettings(host=federation.services.host,
                                        port=federation.services.broker_port,
                                        federation=federation.federation), "poisoner").start(30)
    results = results_queue(federation.federation)
    try:
        client.publish(results, f"not json {unique}")
        client.publish(results, json.dumps({"spoke": unique, "pad": "x" * (3 * 1024 * 1024)}))
        client.publish(results, json.dumps(known.sign(json.dumps(future).encode(),
                                                      MESSAGE_PAYLOAD_TYPE)))
        client.publish(results, seal(heartbeat(spoke_id, 7), known))
        with federation.api() as api:  # the good message behind the poison got through
            wait_for(lambda: api.get(f"/api/spokes/{spoke_id}").json()["queue_depth"] == 7,
                     60, "heartbeat ingested after the poison")
        client.publish(results, seal(heartbeat(spoke_id, 11), later))  # key not enrolled yet
    finally:
        client.close()

    def mine() -> list[dict[str, Any]]:
        with federation.api() as api:
            letters = api.get("/api/dead-letters").raise_for_status().json()
        return [d for d in letters if unique in d["body_preview"] or d["spoke_id"] == spoke_id]

    letters = wait_for(lambda: (found := mine()) and len(found) == 4 and found, 60,
                       "four dead letters")
    reasons = {d["reason"] for d in letters}
    assert all(r.startswith("refused by the hub: ") for r in reasons)
    text = " | ".join(reasons)
    assert "malformed message: not JSON" in text
    assert "exceeds the 2097152 limit" in text
    assert "unsupported protocol version '2.0'" in text
    assert "not an active enrolled key" in text
    listed = dlq_cli(federation, "list")  # the table (other tests' letters beside them)
    assert "dead letter(s)" in listed
    # Whole, in the form for scripts, whatever the terminal's width.
    scripted = [json.loads(line) for line in dlq_cli(federation, "list", "--json").splitlines()]
    by_id = {d["broker_message_id"]: d["reason"] for d in scripted}
    assert {d["broker_message_id"] for d in letters} <= set(by_id)
    assert any("unsupported protocol version" in by_id[d["broker_message_id"]]
               for d in letters)
    assert any("not an active enrolled key" in by_id[d["broker_message_id"]] for d in letters)
    with federation.api() as api:  # and the dashboard shows them, with their reasons
        page = api.get("/dead-letters")
    assert page.status_code == 200
    assert "unsupported protocol version" in page.text and "exceeds the 2097152" in page.text

    unenrolled = next(d for d in letters if "not an active enrolled key" in d["reason"])
    with federation.api() as api:  # the operator fixes the cause, then replays
        api.post(f"/api/spokes/{spoke_id}/keys",
                 json={"public_key_pem": later.public.pem}).raise_for_status()
    dlq_cli(federation, "replay", unenrolled["broker_message_id"])
    with federation.api() as api:
        wait_for(lambda: api.get(f"/api/spokes/{spoke_id}").json()["queue_depth"] == 11,
                 60, "replayed heartbeat ingested")
    for letter in mine():
        dlq_cli(federation, "discard", letter["broker_message_id"], "--reason", "test poison")
    assert mine() == []

    with federation.api() as api:
        events = api.get("/api/audit", params={"limit": 500}).json()
    replayed = [e for e in events if e["action"] == "dead_letter.replayed"
                and e["detail"]["broker_message_id"] == unenrolled["broker_message_id"]]
    discarded = [e for e in events if e["action"] == "dead_letter.discarded"
                 and e["detail"]["reason"] == "test poison"]
    assert len(replayed) == 1 and replayed[0]["actor"].startswith("operator:")
    assert {e["detail"]["broker_message_id"] for e in discarded} == {
        d["broker_message_id"] for d in letters if d is not unenrolled}


def test_a_study_that_expires_for_an_offline_spoke_is_shown_as_a_dead_letter(
        federation: LocalFederation, misbehaving_image: tuple[str, str], unique: str) -> None:
    """The study's expiry bounds how long its message waits for an offline spoke; the
    hub says what it waits for meanwhile, and the expired message shows up as a dead
    letter with that reason."""
    spoke_id = f"away-{unique}"
    with federation.api() as api:
        api.post("/api/spokes", json={"id": spoke_id, "name": "Away site"}).raise_for_status()
        api.post(f"/api/spokes/{spoke_id}/keys", json={
            "public_key_pem": SigningKey.generate().public.pem}).raise_for_status()
    algorithm = federation.register_algorithm(
        name=f"expiry-{unique}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1], argument_schema={"type": "object"})
    with federation.api() as api:
        experiment = api.post("/api/experiments", json={
            "name": "expires", "algorithm_id": algorithm["id"], "spoke_ids": [spoke_id],
            "expires_in_days": 2 / 86400}).raise_for_status().json()  # two seconds
        target = api.post(f"/api/experiments/{experiment['id']}/launch"
                          ).raise_for_status().json()["targets"][0]
        assert target["state"] == "published" and not target["spoke_online"]
        assert target["waiting_for"] == (f"waiting in the broker for spoke {spoke_id}, "
                                         "offline since never")
    broker = BrokerSettings(host=federation.services.host,
                            port=federation.services.broker_port,
                            federation=federation.federation)

    def expired() -> list[dict[str, Any]]:
        deadletters.browse(broker, spoke_queue(spoke_id, federation.federation))  # the
        # broker moves expired messages when their queue is read (else every 30 s)
        with federation.api() as api:
            return [d for d in api.get("/api/dead-letters").json()
                    if d["experiment_id"] == experiment["id"]]

    time.sleep(2.5)
    letter = wait_for(expired, 60, "expired experiment message")[0]
    assert letter["expired"] and letter["kind"] == "experiment"
    assert letter["spoke_id"] == spoke_id
    assert letter["reason"].startswith("expired in the broker before anyone consumed it")

    # Settled from the dashboard's API: by an administrator only, with a reason, audited.
    name, password = f"coord-{unique}", uuid.uuid4().hex
    with federation.api() as api:
        api.post("/api/users", json={"username": name, "password": password,
                                     "roles": ["coordinator"]}).raise_for_status()
        page = api.get("/dead-letters").text
    assert f"/api/dead-letters/{quote(letter['broker_message_id'])}/discard" in page
    discard = f"/api/dead-letters/{quote(letter['broker_message_id'])}/discard"
    with federation.api(federation.sign_in(name, password)) as coordinator:
        assert coordinator.post(discard, json={"reason": "no"}).status_code == 403
        assert "/discard" not in coordinator.get("/dead-letters").text  # no buttons
    with federation.api() as api:
        assert api.post(discard, json={"reason": ""}).status_code == 422
        settled = api.post(discard, json={"reason": "test expiry"})
        assert settled.status_code == 200, settled.text
        assert settled.json()["experiment_id"] == experiment["id"]
        assert api.post(discard, json={"reason": "again"}).status_code == 404
        assert all(d["broker_message_id"] != letter["broker_message_id"]
                   for d in api.get("/api/dead-letters").json())
        [event] = [e for e in api.get("/api/audit", params={
            "action": "dead_letter.discarded"}).json()
            if e["detail"]["broker_message_id"] == letter["broker_message_id"]]
    assert event["actor"] == "admin" and event["detail"]["reason"] == "test expiry"
