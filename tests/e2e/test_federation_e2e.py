"""A federated study end to end on the real broker, registry and Docker engine: three spoke
processes, their own synthetic cohorts, one hub process, and the aggregated figures
checked against the ground truth the generator wrote."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tributary.hub.services.aggregation import match_findings
from tributary.protocol.auditlog import read_entries, verify_log
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_study_across_three_spokes(federation: LocalFederation, detector_image: tuple[str, str],
                                   unique: str) -> None:
    sizes = {f"north-{unique}": 12, f"river-{unique}": 10, f"clare-{unique}": 8}
    truth: dict[str, dict[str, Any]] = {}
    schema = json.loads((ROOT / "examples/lung_nodule/arguments.schema.json").read_text())
    with federation.api() as api:
        for index, (spoke_id, count) in enumerate(sizes.items()):
            data = federation.root / "data" / spoke_id
            truth[spoke_id] = generate_cohort(data, count, seed=100 + index, site=spoke_id)
            federation.start_spoke(spoke_id, federation.add_spoke(spoke_id, data))
        algorithm = federation.register_algorithm(
            name="lung-nodule-e2e", version=detector_image[1][7:19],
            repository=detector_image[0], digest=detector_image[1], argument_schema=schema,
            aggregator="nodule-detection")
        experiment = api.post("/api/experiments", json={
            "name": "e2e study", "algorithm_id": algorithm["id"],
            "arguments": {"min_diameter_mm": 4.0}, "spoke_ids": list(sizes),
            "release": ["nodules"], "limits": {"timeout_seconds": 300, "memory_mb": 1024},
        })
        assert experiment.status_code == 201, experiment.text
        exp_id = experiment.json()["id"]
        assert api.post(f"/api/experiments/{exp_id}/launch").status_code == 200

        final = federation.wait_for_experiment(exp_id, timeout=600)
        cases = api.get(f"/api/experiments/{exp_id}/cases").json()
        report = api.get(f"/api/experiments/{exp_id}/aggregate").json()
        audit = api.get("/api/audit", params={"target": exp_id, "limit": 5000}).json()
        listing = api.get("/").text
        page = api.get(f"/experiments/{exp_id}").text

    # Every case's result arrived exactly once, and every case succeeded.
    assert len(cases) == sum(sizes.values()) >= 30
    assert len({(c["spoke_id"], c["case_id"]) for c in cases}) == len(cases)
    assert all(c["state"] == "succeeded" for c in cases), [c["failure"] for c in cases]
    for target in final["targets"]:
        assert target["state"] == "completed"
        assert target["case_count"] == target["succeeded"] == sizes[target["spoke_id"]]
    results_received = [a for a in audit if a["action"] == "message.received"
                        and a["detail"]["kind"] == "result" and not a["detail"]["duplicate"]]
    assert len(results_received) == len(cases)

    # The pages show the experiment with its per-spoke progress and the aggregated table.
    assert "e2e study" in listing and exp_id in listing
    for spoke_id, count in sizes.items():
        assert spoke_id in listing and spoke_id in page
        assert f"{count} done" in listing
    assert "Sensitivity" in page and "pooled" in page

    # Only pseudonyms left the spokes, and the image that ran is the pinned digest.
    for case in cases:
        assert case["case_id"].startswith("c-")
        assert case["image_digest"] == detector_image[1]

    # The figures match the ground truth the generator wrote, computed independently here.
    for spoke_id, count in sizes.items():
        spoke_truth = truth[spoke_id]
        nodules = [n for case in spoke_truth.values() for n in case["nodules"]]
        group = report["groups"][spoke_id]
        figures = {key: figure["value"] for key, figure in group["figures"].items()}
        assert group["cases"] == group["succeeded"] == count
        assert figures["truth_nodules"] == len(nodules)
        assert figures["sensitivity"] == 1.0
        assert group["figures"]["sensitivity"]["ci_method"] == "wilson"
        assert group["figures"]["sensitivity"]["ci_low"] < 1.0 == group["figures"][
            "sensitivity"]["ci_high"]
        assert figures["false_positives"] == 0
        assert figures["findings"] == len(nodules)
        assert figures["diameter_error_mm"] < 2.5
        # Released ground truth equals the spoke's own, case by case (as a multiset).
        released = sorted(json.dumps(c["released"]["nodules"], sort_keys=True)
                          for c in cases if c["spoke_id"] == spoke_id)
        expected = sorted(json.dumps(v["nodules"], sort_keys=True) for v in spoke_truth.values())
        assert released == expected
    pooled = report["groups"]["pooled"]
    all_nodules = sum(len(v["nodules"]) for t in truth.values() for v in t.values())
    assert pooled["cases"] == sum(sizes.values())
    assert (pooled["figures"]["truth_nodules"]["value"]
            == pooled["figures"]["true_positives"]["value"] == all_nodules)
    # The aggregate was computed as results arrived, one snapshot version per change.
    assert report["version"] >= 2 and report["results"] == len(cases) and report["current"]
    # Spot-check the detector against the truth directly (not through the aggregator).
    for case in cases:
        findings = case["output"]["findings"]
        pairs, misses, extras = match_findings(findings, case["released"]["nodules"])
        assert misses == extras == 0
        for found, real in pairs:
            assert math.dist(found["center_mm"], real["center_mm"]) < real["diameter_mm"] / 2

    # The hub's and every spoke's forensic logs verify; the spokes' record each container.
    assert verify_log(federation.hub_audit_log).ok
    for spoke_id, count in sizes.items():
        log = federation.root / "spokes" / spoke_id / "audit.jsonl"
        started = [e for _, e in read_entries(log) if e and e["action"] == "container.started"]
        assert verify_log(log).ok and len(started) == count
        limits = started[0]["detail"]["limits"]
        assert (limits["memory_mb"], limits["network"]) == (1024, "none")
