"""A hospital's membership is revoked while its spokes run a study, against the real hub
process, broker and spoke agents: the hub's credential watch (every second here) withdraws
that spoke only, the cancellation really crosses the broker (the spoke's journal records
it, with the reason), the other spoke completes and the study completes without the lapsed
one, and the study's audit trail and bundle show the withdrawal and its reason."""

from __future__ import annotations

import io
import json
import sqlite3
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_helpers import wait_for

from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lapsing(tmp_path_factory: pytest.TempPathFactory,
            service_settings: ServiceSettings) -> Iterator[LocalFederation]:
    federation = LocalFederation(tmp_path_factory.mktemp("lapse"), service_settings,
                                 credentials=True, hub_env={
                                     "TRIBUTARY_HUB_CREDENTIAL_LEEWAY_SECONDS": "0",
                                     "TRIBUTARY_HUB_CREDENTIAL_CHECK_SECONDS": "1"})
    try:
        federation.start_hub()
        yield federation
    finally:
        federation.stop()


def journal(federation: LocalFederation, spoke_id: str, experiment_id: str
            ) -> tuple[str | None, str | None]:
    """(the experiment's state, the cancellation's reason) in the spoke's own journal."""
    with sqlite3.connect(federation.root / "spokes" / spoke_id / "journal.db") as db:
        state = db.execute("SELECT state FROM experiments WHERE experiment_id=?",
                           (experiment_id,)).fetchone()
        reason = db.execute("SELECT reason FROM cancellations WHERE experiment_id=?",
                            (experiment_id,)).fetchone()
    return (state[0] if state else None, reason[0] if reason else None)


def test_a_revoked_spoke_is_withdrawn_mid_study_and_the_others_complete(
        lapsing: LocalFederation, misbehaving_image: tuple[str, str], unique: str) -> None:
    federation = lapsing
    leaving, staying = f"leaving-{unique}", f"staying-{unique}"
    configs = {}
    for spoke_id, cases in ((leaving, 5), (staying, 2)):
        data = federation.root / "data" / spoke_id
        generate_cohort(data, cases, seed=len(spoke_id), site=spoke_id)
        configs[spoke_id] = federation.add_spoke(spoke_id, data, concurrency=1)
        federation.start_spoke(spoke_id, configs[spoke_id])
    algorithm = federation.register_algorithm(
        name=f"lapse-{unique}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1], argument_schema={"type": "object"})
    with federation.api() as api:
        experiment = api.post("/api/experiments", json={
            "name": "lapse mid-study", "algorithm_id": algorithm["id"],
            "arguments": {"behaviour": "slow", "seconds": 6}, "spoke_ids": [leaving, staying],
            "limits": {"timeout_seconds": 120, "memory_mb": 256}}).raise_for_status().json()
        experiment_id = experiment["id"]
        api.post(f"/api/experiments/{experiment_id}/launch").raise_for_status()

        def leaving_runs() -> list[dict[str, Any]]:
            cases = api.get(f"/api/experiments/{experiment_id}/cases").json()
            return [c for c in cases if c["spoke_id"] == leaving and c["state"] == "running"]

        wait_for(leaving_runs, 180, "a running case at the spoke about to lapse")
        authority = federation.authority
        authority.revoke(next(c.id for c in authority.state.issued if c.spoke_id == leaving),
                         "agreement ended")

        def withdrawn() -> dict[str, Any] | None:
            study = api.get(f"/api/experiments/{experiment_id}").json()
            target = next(t for t in study["targets"] if t["spoke_id"] == leaving)
            return target if target["state"] == "cancelled" else None

        target = wait_for(withdrawn, 30, "the lapsed spoke's withdrawal")
        assert target["reason"].startswith("membership credential refused: ")
        assert "revoked" in target["reason"]

        # The cancellation crossed the broker: the spoke's own journal has it.
        _, reason = wait_for(lambda: (j := journal(federation, leaving, experiment_id))[1]
                                 and j, 60, "the cancellation in the spoke's journal")
        assert reason == target["reason"]
        wait_for(lambda: journal(federation, leaving, experiment_id)[0] == "cancelled", 60,
                 "the spoke's experiment cancelled")

        done = federation.wait_for_experiment(experiment_id, timeout=240)
        assert done["state"] == "completed"
        targets = {t["spoke_id"]: t for t in done["targets"]}
        assert targets[staying]["state"] == "completed"
        assert targets[leaving]["state"] == "cancelled"
        assert targets[leaving]["reason"] == target["reason"]
        cases = api.get(f"/api/experiments/{experiment_id}/cases").json()
        assert {c["state"] for c in cases if c["spoke_id"] == staying} == {"succeeded"}
        assert not {c["state"] for c in cases if c["spoke_id"] == leaving} & {"queued",
                                                                               "running"}

        audit = api.get("/api/audit", params={"target": experiment_id}).json()
        withdrawal = [e for e in audit if e["action"] == "experiment.spoke_withdrawn"]
        assert len(withdrawal) == 1 and withdrawal[0]["detail"]["spoke"] == leaving
        assert withdrawal[0]["detail"]["reason"] == target["reason"]
        per_spoke = api.get("/api/audit", params={"action": "spoke.withdrawn",
                                                  "target": leaving}).json()
        assert per_spoke and per_spoke[0]["detail"]["experiments"] == [experiment_id]
        assert api.get(f"/api/spokes/{leaving}/credential").json()["state"] == "refused"

        assert targets[leaving]["withdrawn_at"] and not targets[staying]["withdrawn_at"]
        bundle = api.get(f"/api/experiments/{experiment_id}/bundle").raise_for_status()
        with zipfile.ZipFile(io.BytesIO(bundle.content)) as opened:
            name = next(n for n in opened.namelist() if n.endswith("experiment.json"))
            record = json.loads(opened.read(name))
        (entry,) = record["withdrawals"]
        assert entry["action"] == "experiment.spoke_withdrawn" and entry["spoke"] == leaving
        assert entry["reason"] == target["reason"]
        bundled = {t["spoke_id"]: t for t in record["targets"]}
        assert bundled[leaving]["reason"] == target["reason"]
        assert bundled[leaving]["withdrawn_at"]
        page = api.get(f"/experiments/{experiment_id}").text  # the study's page
        assert "membership credential refused" in page and "revoked" in page
        assert page.count("data-withdrawn") == 1  # the leaving spoke's badge, not the other's
    # The spoke process keeps running (it was told to stop one study, not to exit).
    assert federation.processes[f"spoke-{leaving}"].alive()

