"""The site's data steward, end to end with real hub and spoke processes on the real broker
and Docker engine: an experiment waits (durably, across a spoke restart) for approval; its
results wait for review; one is withheld; another experiment is rejected and never runs.
The spoke's release policy holds whatever a study asks for."""

from __future__ import annotations

import base64
import json
import sqlite3

import pytest
from e2e_helpers import add_attribute, pending, steward, wait_target

from tributary.protocol.auditlog import read_entries, verify_log
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


def test_steward_approves_and_rejects_experiments_and_results(
        federation: LocalFederation, misbehaving_image: tuple[str, str], unique: str) -> None:
    spoke_id = f"stew-{unique}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 3, seed=71, site="Steward Hospital")
    # The site holds more about each case than it will ever release.
    add_attribute(data, "birth_year", lambda i, _: 1950 + i)
    config = federation.add_spoke(spoke_id, data, releasable=("nodules",), steward={
        "approve_experiments": True, "review_results": True})
    federation.start_spoke(spoke_id, config)
    algorithm = federation.register_algorithm(
        name=f"stew-{unique}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1])
    label = f"org.tributary.spoke={spoke_id}"

    def launch(name: str) -> str:
        with federation.api() as api:
            exp = api.post("/api/experiments", json={
                "name": name, "algorithm_id": algorithm["id"], "spoke_ids": [spoke_id],
                "arguments": {"behaviour": "ok"}, "release": ["nodules", "birth_year"],
                "limits": {"timeout_seconds": 120, "memory_mb": 256}}).raise_for_status().json()
            api.post(f"/api/experiments/{exp['id']}/launch").raise_for_status()
        return str(exp["id"])

    # 1. The experiment waits for the steward; nothing runs meanwhile.
    created = federation.watch_containers(label)
    first = launch("steward approves")
    wait_target(federation, first, "held", "awaiting approval by the site's data steward")
    waiting = pending(config)["experiments"]
    assert [w["experiment_id"] for w in waiting] == [first]
    assert waiting[0]["digest"] == misbehaving_image[1]
    assert waiting[0]["arguments"] == {"behaviour": "ok"} and waiting[0]["cohort_size"] == 3
    assert waiting[0]["release_allowed"] == ["nodules"]
    human = steward(config, "pending")
    assert first in human.stdout and "cohort size" in human.stdout, human.stdout
    assert created.stop() == []

    # 2. The wait survives a restart of the spoke (the broker message was acknowledged).
    federation.processes[f"spoke-{spoke_id}"].stop()
    federation.start_spoke(spoke_id, config)
    assert [w["experiment_id"] for w in pending(config)["experiments"]] == [first]
    refused = steward(config, "approve", "exp-unknown")
    assert refused.returncode == 1 and "waits for a decision" in refused.stdout

    # 3. Approved: the cases run, and their results wait for review with their output.
    approved = steward(config, "approve", first, "--as", "dr-steward")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    wait_target(federation, first, "held", "3 result(s) await review")
    results = pending(config)["results"]
    assert len(results) == 3 and {r["experiment_id"] for r in results} == {first}
    for r in results:
        assert r["output"] == {"ok": True, "case_id": r["case_id"]}
        assert r["released"].keys() == {"nodules"}  # never birth_year
    with federation.api() as api:
        assert all(c["state"] == "running" for c in
                   api.get(f"/api/experiments/{first}/cases").json())
    keep, withhold = [r["case_id"] for r in results[:2]], results[2]["case_id"]
    for case_id in keep:
        assert steward(config, "approve", first, case_id, "--as", "dr-steward").returncode == 0
    rejected = steward(config, "reject", first, withhold, "--as", "dr-steward",
                       "--reason", "output mentions a rare finding")
    assert rejected.returncode == 0, rejected.stdout

    final = federation.wait_for_experiment(first, timeout=120)
    assert final["targets"][0]["state"] == "completed"
    with federation.api() as api:
        cases = {c["case_id"]: c for c in api.get(f"/api/experiments/{first}/cases").json()}
        hub_audit = api.get("/api/audit", params={"target": first, "limit": 500}).json()
    for case_id in keep:
        assert cases[case_id]["state"] == "succeeded"
        assert cases[case_id]["output"] == {"ok": True, "case_id": case_id}
        assert set(cases[case_id]["released"]) == {"nodules"}
    gone = cases[withhold]
    assert gone["state"] == "failed" and gone["output"] is None and gone["released"] == {}
    assert gone["failure"]["reason"] == "withheld"
    assert "dr-steward" in gone["failure"]["detail"]
    assert "rare finding" in gone["failure"]["detail"]
    # The hub audited what the spoke reported: held, the refused attribute, the withholding.
    statuses = [(a["detail"].get("state"), a["detail"].get("reason") or "") for a in hub_audit
                if a["action"] == "message.received" and a["detail"]["kind"] == "experiment_status"]
    assert any(s == "held" for s, _ in statuses)
    assert any(s == "accepted" and "birth_year" in r for s, r in statuses), statuses
    assert any(a["detail"].get("failure") == "withheld" for a in hub_audit
               if a["action"] == "message.received")
    assert pending(config) == {"experiments": [], "results": []}

    # 4. A rejected experiment never runs, and the hub shows why.
    created = federation.watch_containers(label)
    second = launch("steward rejects")
    wait_target(federation, second, "held", "awaiting approval")
    no = steward(config, "reject", second, "--as", "dr-steward",
                 "--reason", "not covered by our ethics approval")
    assert no.returncode == 0, no.stdout
    final = federation.wait_for_experiment(second, timeout=60)
    target = final["targets"][0]
    assert target["state"] == "refused"
    assert "data steward" in target["reason"] and "ethics approval" in target["reason"]
    assert created.stop() == []

    # 5. What waits is re-verified before it runs: a held experiment edited in the spoke's
    #    database (asking for more memory, say) is refused, approved or not.
    created = federation.watch_containers(label)
    third = launch("tampered while held")
    wait_target(federation, third, "held", "awaiting approval")
    db = sqlite3.connect(federation.root / "spokes" / spoke_id / "journal.db")
    with db:
        (text,) = db.execute("SELECT envelope FROM steward_experiments WHERE experiment_id=?",
                             (third,)).fetchone()
        envelope = json.loads(text)
        body = json.loads(base64.b64decode(envelope["payload"]))
        body["limits"]["memory_mb"] = 4096
        envelope["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
        db.execute("UPDATE steward_experiments SET envelope=? WHERE experiment_id=?",
                   (json.dumps(envelope), third))
    db.close()
    assert steward(config, "approve", third, "--as", "dr-steward").returncode == 0
    final = federation.wait_for_experiment(third, timeout=60)
    assert final["targets"][0]["state"] == "refused"
    assert "no longer verifies" in final["targets"][0]["reason"]
    assert created.stop() == []

    # The spoke's forensic log holds every hold and decision, by whom, and verifies.
    log = federation.root / "spokes" / spoke_id / "audit.jsonl"
    assert verify_log(log).ok
    entries = [e for _, e in read_entries(log) if e]
    decisions = [(e["actor"], e["action"], e["detail"].get("case")) for e in entries
                 if e["action"].startswith("steward.") and e["actor"] == "dr-steward"]
    assert ("dr-steward", "steward.experiment_approved", None) in decisions
    assert ("dr-steward", "steward.result_rejected", withhold) in decisions
    assert ("dr-steward", "steward.experiment_rejected", None) in decisions
    refusals = [e for e in entries if e["action"] == "release.refused"]
    assert refusals and refusals[0]["detail"]["attributes"] == ["birth_year"]
