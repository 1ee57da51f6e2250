"""Cohort criteria through the whole federation: a coordinator's selection by a releasable
attribute picks exactly the matching cases at a real spoke process, and a selection on an
attribute the site does not release is refused there. The site's de-identification
options are the profile its custody records state."""

from __future__ import annotations

import base64
import csv
import json
import sqlite3
import uuid
from typing import Any

import pytest

from tributary.spoke.deid import DeidOptions, profile_name
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


def launch(federation: LocalFederation, spoke_id: str, algorithm_id: int,
           cohort: dict[str, Any], release: list[str]) -> tuple[dict, list[dict]]:
    with federation.api() as api:
        created = api.post("/api/experiments", json={
            "name": f"criteria {cohort}", "algorithm_id": algorithm_id,
            "arguments": {"behaviour": "ok"}, "spoke_ids": [spoke_id], "cohort": cohort,
            "release": release, "limits": {"timeout_seconds": 120, "memory_mb": 256}})
        assert created.status_code == 201, created.text
        exp_id = created.json()["id"]
        api.post(f"/api/experiments/{exp_id}/launch").raise_for_status()
        experiment = federation.wait_for_experiment(exp_id, timeout=300)
        return experiment, api.get(f"/api/experiments/{exp_id}/cases").json()


def test_selection_by_attribute_at_a_spoke(federation: LocalFederation,
                                           misbehaving_image: tuple[str, str]) -> None:
    spoke_id = f"criteria-{uuid.uuid4().hex[:6]}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 4, seed=51, site="Criteria Clinic", size=64, slices=16)
    with open(data / "attributes.csv", newline="") as handle:
        counts = [int(row["nodule_count"]) for row in csv.DictReader(handle)]
    config = federation.add_spoke(spoke_id, data, releasable=("nodule_count",),
                                  deidentification={"retain_modified_dates": True})
    algorithm = federation.register_algorithm(
        name=f"ok-{spoke_id}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1],
        argument_schema={"type": "object", "properties": {"behaviour": {"type": "string"}}})
    federation.start_spoke(spoke_id, config)

    experiment, cases = launch(federation, spoke_id, algorithm["id"],
                               {"modality": "CT", "attributes": {"nodule_count": 0},
                                "min_slices": 16}, ["nodule_count", "nodules"])
    assert experiment["targets"][0]["state"] == "completed"
    assert len(cases) == counts.count(0) >= 1
    for case in cases:
        assert case["state"] == "succeeded"
        assert case["output"] == {"ok": True, "case_id": case["case_id"]}
        assert case["released"] == {"nodule_count": 0}  # "nodules" is not releasable
    with sqlite3.connect(federation.root / "hub.db") as db:
        envelopes = [row[0] for row in db.execute(
            "SELECT custody FROM caseresult WHERE experiment_id=?", (experiment["id"],))]
    profiles = {json.loads(base64.b64decode(json.loads(e)["payload"]))["predicate"][
        "deid_profile"] for e in envelopes}
    assert profiles == {profile_name(DeidOptions(retain_modified_dates=True))}

    experiment, cases = launch(federation, spoke_id, algorithm["id"],
                               {"attributes": {"nodules": "[]"}}, [])
    target = experiment["targets"][0]
    assert target["state"] == "refused" and "nodules" in target["reason"]
    assert cases == []
