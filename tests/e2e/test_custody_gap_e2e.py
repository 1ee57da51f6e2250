"""A result message that never reaches the hub (issue 10, item 22). It is really removed from
the broker mid-study, by an exclusive consumer on the results queue that takes it away. The
hub must not refuse every later result of the spoke for ever, nor call the study completed
while a case has no result: it asks the spoke to resend the missing records from its
journal, or an administrator accepts the gap explicitly (audited, and in the export)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import stomp
from e2e_helpers import wait_for

from tributary.protocol.destinations import results_queue, spoke_queue
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


@contextmanager
def thief(federation: LocalFederation, queue: str, kind: str,
          limit: int | None = 1) -> Iterator[list[str]]:
    """Consume ``queue`` exclusively: while it is subscribed the broker hands it every
    message, and nothing to the hub or spoke. It acknowledges (removes for good) up to
    ``limit`` messages of ``kind``; the others it never acknowledges, so they go back to
    the queue, in order, when it disconnects."""
    stolen: list[str] = []
    conn = stomp.Connection12([(federation.services.host, federation.services.broker_port)])

    class Listener(stomp.ConnectionListener):
        def on_message(self, frame: stomp.utils.Frame) -> None:
            if frame.headers.get("tributary-kind") == kind and (
                    limit is None or len(stolen) < limit):
                stolen.append(frame.headers.get("tributary-message-id", ""))
                conn.ack(frame.headers["ack"])

    conn.set_listener("", Listener())
    conn.connect(wait=True)
    conn.subscribe(queue, id="thief", ack="client-individual",
                   headers={"activemq.exclusive": "true", "activemq.prefetchSize": "1000"})
    try:
        yield stolen
    finally:
        conn.disconnect()


def launch(federation: LocalFederation, misbehaving_image: tuple[str, str], spoke_id: str,
           name: str) -> str:
    with federation.api() as api:
        algorithm = federation.register_algorithm(
            name=name, version="1", repository=misbehaving_image[0],
            digest=misbehaving_image[1], argument_schema={"type": "object"})
        experiment = api.post("/api/experiments", json={
            "name": name, "algorithm_id": algorithm["id"], "arguments": {"behaviour": "ok"},
            "spoke_ids": [spoke_id], "limits": {"timeout_seconds": 120, "memory_mb": 256},
        }).raise_for_status().json()
        api.post(f"/api/experiments/{experiment['id']}/launch").raise_for_status()
        return str(experiment["id"])


def study(api: Any, experiment_id: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    experiment = api.get(f"/api/experiments/{experiment_id}").json()
    cases = api.get(f"/api/experiments/{experiment_id}/cases").json()
    return experiment, {c["case_id"]: c for c in cases}


def never_completed_with_open_cases(experiment: dict[str, Any],
                                    cases: dict[str, dict[str, Any]]) -> None:
    unsettled = [c for c, row in cases.items() if row["state"] in ("queued", "running")]
    if unsettled:
        assert experiment["state"] != "completed", f"completed with {unsettled} unsettled"
        assert experiment["targets"][0]["state"] != "completed"


def start(federation: LocalFederation, spoke_id: str) -> None:
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 2, seed=5, site="Gap site")
    config = federation.add_spoke(spoke_id, data, concurrency=1)
    config.write_text(config.read_text() + "\n[liveness]\nheartbeat_seconds = 1\n")
    federation.start_spoke(spoke_id, config)


def test_a_deleted_result_is_resent_from_the_spokes_journal(
        federation: LocalFederation, misbehaving_image: tuple[str, str], unique: str) -> None:
    spoke_id = f"gap-{unique}"
    start(federation, spoke_id)
    with thief(federation, results_queue(federation.federation), "result") as stolen:
        experiment_id = launch(federation, misbehaving_image, spoke_id, f"gap-{unique}")
        wait_for(lambda: stolen, 120, "a result message taken off the broker")
    with federation.api() as api:
        def settled() -> bool:
            experiment, cases = study(api, experiment_id)
            never_completed_with_open_cases(experiment, cases)
            return (experiment["state"] == "completed" and len(cases) == 2
                    and all(c["state"] == "succeeded" for c in cases.values()))

        wait_for(settled, 120, "every case's result, the deleted one resent")
        audit = api.get("/api/audit", params={"target": spoke_id}).json()
        actions = [e["action"] for e in audit]
        assert "custody.gap" in actions and "custody.resend_requested" in actions
        gaps = api.get(f"/api/spokes/{spoke_id}/custody-gaps").json()
        assert gaps and {g["state"] for g in gaps} == {"resolved"}
        assert gaps[0]["first_missing"] == 1


def test_an_unrecoverable_gap_is_accepted_by_an_administrator(
        federation: LocalFederation, misbehaving_image: tuple[str, str], unique: str) -> None:
    spoke_id = f"gapa-{unique}"
    start(federation, spoke_id)
    results = results_queue(federation.federation)
    with thief(federation, results, "result") as stolen:
        experiment_id = launch(federation, misbehaving_image, spoke_id, f"gapa-{unique}")
        wait_for(lambda: stolen, 120, "a result message taken off the broker")
        # The spoke holds the experiment now; from here its queue loses every resend request
        # (as if its journal had lost the record: nothing can fill the gap).
        spoke_thief = thief(federation, spoke_queue(spoke_id, federation.federation),
                            "resend_records", limit=None)
        requests = spoke_thief.__enter__()
    try:
        with federation.api() as api:
            def spoke_done() -> dict[str, Any]:
                experiment, cases = study(api, experiment_id)
                never_completed_with_open_cases(experiment, cases)
                gaps = api.get(f"/api/spokes/{spoke_id}/custody-gaps").json()
                return requests and isinstance(gaps, list) and gaps and "missing" in (
                    experiment["targets"][0]["reason"] or "") and gaps[0]

            gap = wait_for(spoke_done, 120, "the spoke's completion, with a gap the hub sees")
            experiment, cases = study(api, experiment_id)
            assert experiment["state"] == "launched"
            assert gap["state"] == "open" and gap["first_missing"] == 1
    finally:
        spoke_thief.__exit__(None, None, None)
    # The resend requests never reached the spoke: an administrator accepts the gap.
    with federation.api() as api:
        accepted = api.post(f"/api/spokes/{spoke_id}/custody-gaps/{gap['id']}/accept",
                            json={"reason": "record lost with the broker's disk"})
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["state"] == "accepted"

        def settled() -> dict[str, dict[str, Any]]:
            experiment, cases = study(api, experiment_id)
            never_completed_with_open_cases(experiment, cases)
            states = sorted(c["state"] for c in cases.values())
            return experiment["state"] == "completed" and states == [
                "failed", "succeeded"] and cases

        # The lost case is settled as lost; the result refused while the gap was open is
        # asked for again, and arrives.
        cases = wait_for(settled, 120, "the study settled after the accepted gap")
        lost = next(c for c in cases.values() if c["state"] == "failed")
        assert lost["failure"]["reason"] == "lost_in_transit"
        audit = api.get("/api/audit", params={"target": spoke_id}).json()
        accepting = [e for e in audit if e["action"] == "custody.gap_accepted"]
        assert accepting and accepting[0]["actor"] == "admin"
        exported = api.get(f"/api/experiments/{experiment_id}/custody-gaps").json()
        assert [(g["spoke_id"], g["state"], g["accepted_by"]) for g in exported] == [
            (spoke_id, "accepted", "admin")]
