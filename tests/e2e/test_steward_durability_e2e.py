"""The data steward inside the durable spoke, end to end (real hub, spoke, broker and Docker
engine): results waiting for review survive a kill -9 of the spoke without their cases
running again, and a cancellation by the hub discards whatever still waits for the
steward, whether an experiment awaiting approval or results awaiting review; nothing of a
cancelled experiment leaves unreviewed."""

from __future__ import annotations

import signal
import time

import pytest
from e2e_helpers import pending, steward, wait_target

from tributary.protocol.auditlog import read_entries
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


def test_held_work_survives_a_crash_and_a_cancellation_discards_it(
        federation: LocalFederation, misbehaving_image: tuple[str, str], unique: str) -> None:
    spoke_id = f"stdur-{unique}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 2, seed=91, site="Durable Steward Hospital")
    config = federation.add_spoke(spoke_id, data, concurrency=2, steward={
        "approve_experiments": True, "review_results": True})
    federation.start_spoke(spoke_id, config)
    algorithm = federation.register_algorithm(
        name=f"stdur-{unique}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1])
    label = f"org.tributary.spoke={spoke_id}"

    def launch(name: str) -> str:
        with federation.api() as api:
            exp = api.post("/api/experiments", json={
                "name": name, "algorithm_id": algorithm["id"], "spoke_ids": [spoke_id],
                "arguments": {"behaviour": "ok"},
                "limits": {"timeout_seconds": 120, "memory_mb": 256}}).raise_for_status().json()
            api.post(f"/api/experiments/{exp['id']}/launch").raise_for_status()
        return str(exp["id"])

    def cancel(experiment_id: str, reason: str) -> None:
        with federation.api() as api:
            api.post(f"/api/experiments/{experiment_id}/cancel",
                     json={"reason": reason}).raise_for_status()

    # 1. An experiment awaiting approval, cancelled: the hub is told at once, the steward's
    #    desk no longer lists it, and a late approval finds nothing to approve.
    created = federation.watch_containers(label)
    first = launch("cancelled while awaiting approval")
    wait_target(federation, first, "held", "awaiting approval")
    cancel(first, "wrong protocol")
    wait_target(federation, first, "cancelled", "wrong protocol", timeout=60)
    assert pending(config)["experiments"] == []
    late = steward(config, "approve", first)
    assert late.returncode == 1 and "waits for a decision" in late.stdout

    # 2. Approved, its cases run once; their results wait for review, and still do after
    #    the spoke is killed: they are neither lost nor run again.
    second = launch("reviewed, then cancelled")
    wait_target(federation, second, "held", "awaiting approval")
    assert steward(config, "approve", second, "--as", "dr-steward").returncode == 0
    wait_target(federation, second, "held", "2 result(s) await review")
    assert len(created.stop()) == 2
    process = federation.processes[f"spoke-{spoke_id}"]
    process.popen.send_signal(signal.SIGKILL)
    process.popen.wait(30)
    rerun = federation.watch_containers(label)
    federation.start_spoke(spoke_id, config)
    results = pending(config)["results"]
    assert sorted(r["experiment_id"] for r in results) == [second, second]
    time.sleep(5)  # long enough for a (wrong) re-run to start
    assert rerun.stop() == []

    # 3. Cancelled while its results wait: they never leave, and the hub counts their cases
    #    among those cancelled, without output.
    cancel(second, "study withdrawn")
    wait_target(federation, second, "cancelled", "study withdrawn", timeout=60)
    assert pending(config) == {"experiments": [], "results": []}
    with federation.api() as api:
        cases = api.get(f"/api/experiments/{second}/cases").json()
    assert len(cases) == 2
    assert all(c["state"] == "cancelled" and c["output"] is None for c in cases), cases

    log = federation.root / "spokes" / spoke_id / "audit.jsonl"
    entries = [e for _, e in read_entries(log) if e]
    assert not [e for e in entries if e["action"] == "result.published"]
    discarded = {e["target"] for e in entries if e["action"] == "steward.discarded"}
    assert discarded == {first, second}
