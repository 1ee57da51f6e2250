"""Nothing lost, nothing doubled, whatever goes away: real hub, spoke and broker processes
and real algorithm containers, stopped and killed during studies of 51 cases across three
spokes (and a 201-case chaos run). Afterwards every case has exactly one accepted result
and the hub's figures equal those of an undisturbed run of the same study.

The broker is a private instance (see :mod:`tributary.testbed.faults`): the shared one is never
touched.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tributary.services.settings import ServiceSettings
from tributary.testbed.faults import FaultRig, chaos

pytestmark = pytest.mark.e2e

SPOKES = 3
STUDY_CASES = 17  # per spoke: 51 per study
CHAOS_CASES = 67  # per spoke: 201 in the chaos study
#: Fast cases that still run long enough to be caught running (progress file included).
ARGUMENTS = {"behaviour": "slow", "seconds": 1}
CHAOS_SECONDS = float(os.environ.get("TRIBUTARY_CHAOS_SECONDS", "35"))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, service_settings: ServiceSettings,
        misbehaving_image: tuple[str, str]) -> Iterator[FaultRig]:
    rig = FaultRig(tmp_path_factory.mktemp("faults"), service_settings, misbehaving_image,
                   spokes=SPOKES, cases_per_spoke=CHAOS_CASES).start()
    yield rig
    rig.close()


@pytest.fixture(scope="module")
def baseline(rig: FaultRig) -> dict[str, Any]:
    """The same study, undisturbed: the figures every disturbed run must reproduce."""
    experiment_id = rig.launch(ARGUMENTS, max_cases=STUDY_CASES)
    rig.wait_completed(experiment_id)
    assert rig.check_exactly_once(experiment_id, SPOKES * STUDY_CASES) == []
    return rig.figures(experiment_id)


def settle(rig: FaultRig, experiment_id: str, baseline: dict[str, Any]) -> None:
    rig.wait_completed(experiment_id)
    rig.retry_failed(experiment_id)  # cases whose container was killed: a new attempt
    problems = rig.check_exactly_once(experiment_id, SPOKES * STUDY_CASES)
    assert problems == [], problems
    assert rig.figures(experiment_id) == baseline


def published(rig: FaultRig) -> int:
    """Results the spokes have handed to the broker (their audit logs)."""
    return sum(config.parent.joinpath("audit.jsonl").read_text().count('"result.published"')
               for config in rig.configs.values())


def test_hub_stopped_then_killed_loses_and_doubles_nothing(
        rig: FaultRig, baseline: dict[str, Any]) -> None:
    experiment_id = rig.launch(ARGUMENTS, max_cases=STUDY_CASES)
    rig.wait_succeeded(experiment_id, 8)
    rig.stop_hub()
    before = published(rig)
    # the spokes go on working and their results wait in the broker
    deadline = time.monotonic() + 120
    while published(rig) < before + 6 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert published(rig) >= before + 6, "spokes stopped publishing while the hub was down"
    rig.start_hub()
    rig.wait_succeeded(experiment_id, 25)
    rig.stop_hub(kill=True)
    time.sleep(3)
    rig.start_hub()
    settle(rig, experiment_id, baseline)


def test_spokes_killed_stopped_and_a_container_killed(
        rig: FaultRig, baseline: dict[str, Any]) -> None:
    first, second, third = sorted(rig.configs)
    experiment_id = rig.launch(ARGUMENTS, max_cases=STUDY_CASES)
    rig.wait_succeeded(experiment_id, 6)
    rig.stop_spoke(first, kill=True)
    rig.stop_spoke(second)

    def shown_offline() -> bool:
        experiment = rig.experiment(experiment_id) or {"targets": []}
        target = next(t for t in experiment["targets"] if t["spoke_id"] == first)
        return not target["spoke_online"] and "offline" in (target["waiting_for"] or "")

    deadline = time.monotonic() + 30
    while not shown_offline() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert shown_offline(), "the hub should show the killed spoke offline"
    with rig.federation.api() as api:
        spokes = {s["id"]: s for s in api.get("/api/spokes").json()}
    assert not spokes[first]["online"] and spokes[third]["online"]
    assert spokes[third]["concurrency"] == rig.concurrency

    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline:
        killed = rig.kill_container(third)
        time.sleep(0.2)
    assert killed, "no running container of the third spoke to kill"
    rig.start_spoke(first)
    rig.start_spoke(second)
    rig.wait_completed(experiment_id)
    cases = {c["case_id"]: c for c in rig.cases(experiment_id) if c["spoke_id"] == third}
    assert cases[killed]["state"] == "failed"
    assert cases[killed]["failure"]["reason"] == "killed"
    settle(rig, experiment_id, baseline)
    retried = next(c for c in rig.cases(experiment_id)
                   if c["spoke_id"] == third and c["case_id"] == killed)
    assert [(a["attempt"], a["state"]) for a in retried["attempts"]] == [
        (1, "failed"), (2, "succeeded")]


def test_broker_stopped_then_killed_loses_and_doubles_nothing(
        rig: FaultRig, baseline: dict[str, Any]) -> None:
    experiment_id = rig.launch(ARGUMENTS, max_cases=STUDY_CASES)
    rig.wait_succeeded(experiment_id, 8)
    rig.stop_broker()
    with rig.federation.api() as api:  # a launch while the broker is away sends nothing...
        created = api.post("/api/experiments", json={
            "name": "launched during the outage", "algorithm_id": rig.algorithm_id,
            "arguments": {"behaviour": "ok"}, "spoke_ids": list(rig.configs),
            "cohort": {"max_cases": 2}}).raise_for_status().json()
        refused = api.post(f"/api/experiments/{created['id']}/launch")
        assert refused.status_code == 503 and "broker is unreachable" in refused.text
        waiting = api.get(f"/api/experiments/{created['id']}").json()["targets"]
        assert all("not published yet" in t["waiting_for"] for t in waiting)
    time.sleep(2)
    rig.start_broker()
    with rig.federation.api() as api:  # ...and launching again publishes what is missing
        deadline = time.monotonic() + 60  # once the hub has reconnected (with backoff)
        while not api.get("/api/health").json()["broker_connected"]:
            assert time.monotonic() < deadline, "the hub did not reconnect to the broker"
            time.sleep(0.5)
        api.post(f"/api/experiments/{created['id']}/launch").raise_for_status()
    rig.wait_succeeded(experiment_id, 25)
    rig.stop_broker(kill=True)
    time.sleep(3)
    rig.start_broker()
    settle(rig, experiment_id, baseline)
    assert rig.wait_completed(created["id"])["state"] == "completed"
    assert rig.check_exactly_once(created["id"], SPOKES * 2) == []


def test_chaos_kills_random_components_and_nothing_is_lost_or_doubled(
        rig: FaultRig, capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("TRIBUTARY_CHAOS_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    with capsys.disabled():
        print(f"\nchaos seed {seed}, {CHAOS_SECONDS:.0f} s, {SPOKES * CHAOS_CASES} cases")
        experiment_id = rig.launch({"behaviour": "ok"})
        steps = chaos(rig, experiment_id, CHAOS_SECONDS, rng)
    for name in ("hub", *(f"spoke-{s}" for s in rig.configs)):
        assert rig.alive(name), f"{name} should have been restarted"
    rig.wait_completed(experiment_id, timeout=400)
    for _ in range(3):  # a killed container fails its case: run it again
        if not rig.retry_failed(experiment_id, timeout=300):
            break
    problems = rig.check_exactly_once(experiment_id, SPOKES * CHAOS_CASES)
    assert problems == [], f"chaos steps {steps}: {problems}"
    with capsys.disabled():
        print(f"chaos: {len(steps)} steps, {rig.duplicates_ignored(experiment_id)} duplicate "
              "deliveries ignored, 0 lost, 0 doubled")

