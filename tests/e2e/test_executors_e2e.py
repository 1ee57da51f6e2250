"""One study, three executors: the local Docker engine, Podman through its Docker-compatible
socket, and a real one-machine Slurm cluster whose jobs run the image with Podman; and a
rootless Podman running the spoke's runner. Real spoke processes, real engines, the
project's own service scripts.

What is checked is what the hub ends up with (the same results on each executor, every
case exactly one result), what Slurm says about the jobs (cancelled, never submitted
twice), and that no container is left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import wait_for, wait_target

from tributary.protocol.contract import Participant, ParticipantSeries
from tributary.protocol.messages import AlgorithmRef, RunLimits
from tributary.services import podman, slurm
from tributary.services.settings import ServiceSettings
from tributary.spoke.config import ExecutionSettings, RunnerSettings, SlurmSettings
from tributary.spoke.engines import engine_client
from tributary.spoke.images import ensure_image
from tributary.spoke.journal import Journal
from tributary.spoke.runner import run_case
from tributary.spoke.slurm import SlurmRunner
from tributary.testbed.federation import LocalFederation, execution_toml, generate_cohort

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SLOW_SCHEMA = {"type": "object", "properties": {"behaviour": {"type": "string"},
                                                "seconds": {"type": "number"}}}


@pytest.fixture(scope="module")
def podman_socket(service_settings: ServiceSettings) -> str:
    return podman.ensure_running(service_settings)


@pytest.fixture(scope="module")
def slurm_conf(service_settings: ServiceSettings, podman_socket: str) -> str:
    return slurm.ensure_running(service_settings)


def add_spoke(federation: LocalFederation, prefix: str, data: Path, engine: str,
              concurrency: int = 2) -> tuple[str, Path]:
    spoke_id = f"{prefix}-{uuid.uuid4().hex[:6]}"
    config = federation.add_spoke(spoke_id, data, concurrency=concurrency,
                                  execution=execution_toml(engine, federation.services))
    return spoke_id, config


def squeue(services: ServiceSettings, prefix: str) -> list[tuple[str, str, str]]:
    """(id, state, name) of every job Slurm knows whose name starts with ``prefix``."""
    done = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%j"],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, **slurm.environment(services)})
    rows = [tuple(line.strip().split("|")) for line in done.stdout.splitlines()]
    return [r for r in rows if len(r) == 3 and r[2].startswith(prefix)]  # type: ignore[misc]


def podman_containers(services: ServiceSettings, spoke_id: str) -> list[str]:
    done = subprocess.run(["podman", "ps", "--all", "--quiet", "--filter",
                           f"label=org.tributary.spoke={spoke_id}"], capture_output=True,
                          text=True, check=True, env={**os.environ,
                                                      **podman.environment(services)})
    return done.stdout.split()


def launch(federation: LocalFederation, algorithm_id: int, spoke_ids: list[str],
           arguments: dict[str, Any], **limits: Any) -> str:
    with federation.api() as api:
        created = api.post("/api/experiments", json={
            "name": f"executors {uuid.uuid4().hex[:4]}", "algorithm_id": algorithm_id,
            "arguments": arguments, "spoke_ids": spoke_ids,
            "limits": {"timeout_seconds": 300, "memory_mb": 512, **limits}})
        assert created.status_code == 201, created.text
        experiment_id = str(created.json()["id"])
        api.post(f"/api/experiments/{experiment_id}/launch").raise_for_status()
    return experiment_id


def hub_cases(federation: LocalFederation, experiment_id: str) -> list[dict[str, Any]]:
    with federation.api() as api:
        return list(api.get(f"/api/experiments/{experiment_id}/cases").raise_for_status()
                    .json())


def accepted_results(federation: LocalFederation, experiment_id: str) -> list[str]:
    """Result messages the hub applied (not refused, not duplicates), from its audit log."""
    entries = map(json.loads, federation.hub_audit_log.read_text().splitlines())
    return [e["detail"]["case"] for e in entries
            if e["action"] == "message.received" and e["target"] == experiment_id
            and e["detail"].get("kind") == "result" and not e["detail"].get("duplicate")]


def audit_entries(config: Path, action: str) -> list[dict[str, Any]]:
    lines = (config.parent / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["action"] == action]


def test_same_study_same_results_on_docker_podman_and_slurm(
        federation: LocalFederation, detector_image: tuple[str, str], slurm_conf: str) -> None:
    """Three spokes holding the same two cases, one per executor: the detector finds the
    same nodules on each, and every case arrives exactly once."""
    data = federation.root / "data" / f"executors-{uuid.uuid4().hex[:6]}"
    generate_cohort(data, 2, seed=14, site="executors", size=128, slices=32)
    spokes = {engine: add_spoke(federation, engine, data, engine)
              for engine in ("docker", "podman", "slurm")}
    for spoke_id, config in spokes.values():
        federation.start_spoke(spoke_id, config)
    schema = json.loads((ROOT / "examples/lung_nodule/arguments.schema.json").read_text())
    algorithm = federation.register_algorithm(
        name=f"executors-{uuid.uuid4().hex[:6]}", version="1", repository=detector_image[0],
        digest=detector_image[1], argument_schema=schema)
    experiment_id = launch(federation, algorithm["id"], [s for s, _ in spokes.values()],
                           {"min_diameter_mm": 4.0}, memory_mb=1024)
    experiment = federation.wait_for_experiment(experiment_id, timeout=300)

    assert {t["state"] for t in experiment["targets"]} == {"completed"}
    cases = hub_cases(federation, experiment_id)
    assert all(c["state"] == "succeeded" for c in cases), [c["failure"] for c in cases]
    assert sorted(accepted_results(federation, experiment_id)) == sorted(
        c["case_id"] for c in cases), "each case exactly one accepted result"

    def findings(spoke_id: str) -> list[str]:
        outputs = [c["output"] for c in cases if c["spoke_id"] == spoke_id]
        assert len(outputs) == 2
        return sorted(json.dumps({k: v for k, v in o.items() if k != "series_id"},
                                 sort_keys=True) for o in outputs)

    docker_findings = findings(spokes["docker"][0])
    assert any(json.loads(f)["nodule_count"] for f in docker_findings), docker_findings
    assert findings(spokes["podman"][0]) == docker_findings
    assert findings(spokes["slurm"][0]) == docker_findings
    # Each ran where its site said: a container of Podman's, a Slurm job.
    started = {engine: audit_entries(config, "container.started")
               for engine, (_, config) in spokes.items()}
    assert {e["detail"]["engine"] for e in started["podman"]} == {"podman"}
    assert all(e["detail"]["container_id"].startswith("slurm:") for e in started["slurm"])
    slurm_id = spokes["slurm"][0]
    jobs = squeue(federation.services, f"tributary-{slurm_id}-")
    assert sorted(state for _, state, _ in jobs) == ["COMPLETED", "COMPLETED"], jobs
    for engine in ("podman", "slurm"):
        assert not podman_containers(federation.services, spokes[engine][0])


def test_slurm_cancels_a_queued_and_a_running_case(
        federation: LocalFederation, misbehaving_image: tuple[str, str], slurm_conf: str,
) -> None:
    """Each case asks for both of the node's CPUs, so one job runs while the other waits
    in Slurm's queue; cancelling the study through the hub cancels both jobs, and both
    cases end cancelled."""
    data = federation.root / "data" / f"slurm-cancel-{uuid.uuid4().hex[:6]}"
    generate_cohort(data, 2, seed=15, site="cancel", size=64, slices=16)
    spoke_id, config = add_spoke(federation, "slurm-cancel", data, "slurm")
    node_cpus = float(os.cpu_count() or 1)  # what the local cluster's node offers
    config.write_text(config.read_text().replace("[runner]\n",
                                                 f"[runner]\nmax_cpus = {node_cpus}\n", 1))
    federation.start_spoke(spoke_id, config)
    algorithm = federation.register_algorithm(
        name=f"slow-{spoke_id}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1], argument_schema=SLOW_SCHEMA)
    experiment_id = launch(federation, algorithm["id"], [spoke_id],
                           {"behaviour": "slow", "seconds": 120}, cpus=node_cpus)
    prefix = f"tributary-{spoke_id}-"
    wait_for(lambda: sorted(s for _, s, _ in squeue(federation.services, prefix))
             == ["PENDING", "RUNNING"], 120, "one running and one queued Slurm job")
    with federation.api() as api:
        api.post(f"/api/experiments/{experiment_id}/cancel",
                 json={"reason": "cancel on slurm"}).raise_for_status()
    wait_target(federation, experiment_id, "cancelled", timeout=90)

    jobs = squeue(federation.services, prefix)
    assert sorted(state for _, state, _ in jobs) == ["CANCELLED", "CANCELLED"], jobs
    finished = audit_entries(config, "container.finished")
    assert sorted(e["detail"]["outcome"] for e in finished) == ["cancelled", "cancelled"]
    assert {c["state"] for c in hub_cases(federation, experiment_id)} == {"cancelled"}
    assert not podman_containers(federation.services, spoke_id)


@pytest.mark.parametrize("stop", ["kill -9", "SIGTERM"])
def test_slurm_spoke_restarted_adopts_its_jobs(
        federation: LocalFederation, misbehaving_image: tuple[str, str], slurm_conf: str,
        stop: str) -> None:
    """kill -9 (or a clean stop) of the spoke while its Slurm jobs run: the jobs go on, the
    restarted spoke adopts them (no second submission) and the hub gets exactly one result
    per case."""
    data = federation.root / "data" / f"slurm-kill-{uuid.uuid4().hex[:6]}"
    generate_cohort(data, 2, seed=16, site="kill", size=64, slices=16)
    spoke_id, config = add_spoke(federation, "slurm-kill", data, "slurm")
    spoke = federation.start_spoke(spoke_id, config)
    algorithm = federation.register_algorithm(
        name=f"slow-{spoke_id}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1], argument_schema=SLOW_SCHEMA)
    experiment_id = launch(federation, algorithm["id"], [spoke_id],
                           {"behaviour": "slow", "seconds": 8}, cpus=1.0)
    prefix = f"tributary-{spoke_id}-"
    wait_for(lambda: [s for _, s, _ in squeue(federation.services, prefix)]
             == ["RUNNING", "RUNNING"], 120, "two running Slurm jobs")
    spoke.popen.send_signal(signal.SIGKILL if stop == "kill -9" else signal.SIGTERM)
    spoke.popen.wait(60)
    assert [s for _, s, _ in squeue(federation.services, prefix)] == ["RUNNING", "RUNNING"], (
        "the spoke's jobs outlive it")
    federation.start_spoke(spoke_id, config)
    experiment = federation.wait_for_experiment(experiment_id, timeout=120)

    assert experiment["targets"][0]["state"] == "completed"
    cases = hub_cases(federation, experiment_id)
    assert [c["state"] for c in cases] == ["succeeded", "succeeded"], cases
    assert all(c["attempt"] == 1 for c in cases)
    assert sorted(accepted_results(federation, experiment_id)) == sorted(
        c["case_id"] for c in cases), "each case exactly one accepted result"
    jobs = squeue(federation.services, prefix)
    assert sorted(state for _, state, _ in jobs) == ["COMPLETED", "COMPLETED"], (
        f"each case one job, never a second submission: {jobs}")
    if stop == "kill -9":
        assert len(audit_entries(config, "case.interrupted")) == 2
    else:
        assert len(audit_entries(config, "case.released")) == 2
    started = [e["detail"]["container_id"] for e in audit_entries(config, "container.started")]
    assert len(started) == 4 and len(set(started)) == 2, f"adopted, not resubmitted: {started}"
    assert not podman_containers(federation.services, spoke_id)


def test_rootless_podman_runs_cases_with_the_same_isolation(
        service_settings: ServiceSettings, misbehaving_image: tuple[str, str]) -> None:
    """A rootless Podman (its own unprivileged user): the image is pulled and checked by
    digest through its socket, and the runner's flags hold: the output folder (owned by
    the uid the algorithm's user maps to; no quota tmpfs, which a rootless Podman's mount
    namespace would not see) is written, the network is not there, the input stays
    read-only."""
    socket_url = podman.ensure_rootless(service_settings)
    execution = ExecutionSettings(engine="podman", podman_socket=socket_url,
                                  algorithm_uid=podman.mapped_uid())
    client = engine_client(execution)
    ref = AlgorithmRef(name="misbehaving", version="1", repository=misbehaving_image[0],
                       digest=misbehaving_image[1])
    # The rootless user must reach the folders it mounts: one of its own under /tmp.
    root = Path(tempfile.mkdtemp(prefix="tributary-rootless-"))
    outcomes = {}
    try:
        root.chmod(0o755)
        series = root / "series"
        series.mkdir()
        (series / "1.dcm").write_bytes(b"\0" * 256)
        (series / "1.dcm").chmod(0o644)
        series.chmod(0o755)
        ensure_image(client, ref, [service_settings.registry])
        for behaviour in ("ok", "network", "write-input"):
            outcomes[behaviour] = run_case(
                client, ref.reference, name=f"tributary-rootless-{uuid.uuid4().hex[:8]}",
                participant=Participant(
                    case_id="c-0123456789abcdef", experiment_id="exp-rl",
                    series=[ParticipantSeries(series_id="s-0123456789abcdef", modality="CT",
                                              path="/tributary/input/s-1", instance_count=1)]),
                mounts={"/tributary/input/s-1": series}, arguments={"behaviour": behaviour},
                limits=RunLimits(timeout_seconds=60, memory_mb=256, cpus=1.0),
                settings=RunnerSettings(output_quota_mb=0), case_dir=root / behaviour,
                max_output_bytes=1 << 20, labels={}, oom_reported=False,
                algorithm_uid=execution.algorithm_uid)
        left = sorted(p.name for p in series.iterdir())
    finally:
        client.close()
        shutil.rmtree(root, ignore_errors=True)
    assert outcomes["ok"].output == {"ok": True, "case_id": "c-0123456789abcdef"}
    network = outcomes["network"].failure
    assert network is not None and "network access failed" in (network.log_tail or "")
    write = outcomes["write-input"].failure  # it exits 1 when the write fails
    assert write is not None and write.exit_code == 1, write
    assert left == ["1.dcm"], "the input stays as it was"


def test_slurm_jobs_keep_the_runners_isolation_and_limits(
        tmp_path: Path, service_settings: ServiceSettings, slurm_conf: str,
        misbehaving_image: tuple[str, str]) -> None:
    """Through the Slurm runner itself: no network, a read-only input, the time limit
    counted from the container's start, and output read as on any engine."""
    settings = SlurmSettings(slurm_conf=Path(slurm_conf), partition=slurm.PARTITION,
                             podman_env=podman.environment(service_settings),
                             poll_seconds=0.5)
    journal = Journal(tmp_path / "journal.db")
    runner = SlurmRunner(settings, journal)
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"\0" * 256)
    image = f"{misbehaving_image[0]}@{misbehaving_image[1]}"
    outcomes = {}
    for number, (behaviour, timeout) in enumerate((("ok", 60), ("network", 60),
                                                    ("write-input", 60), ("hang", 3))):
        outcomes[behaviour] = runner.run_case(
            image, ("exp-slurm", "c-0123456789abcdef", number + 1),
            name=f"tributary-isolation-{uuid.uuid4().hex[:8]}",
            participant=Participant(
                case_id="c-0123456789abcdef", experiment_id="exp-slurm",
                series=[ParticipantSeries(series_id="s-0123456789abcdef", modality="CT",
                                          path="/tributary/input/s-1", instance_count=1)]),
            mounts={"/tributary/input/s-1": series}, arguments={"behaviour": behaviour},
            limits=RunLimits(timeout_seconds=timeout, memory_mb=256, cpus=1.0),
            settings=RunnerSettings(), case_dir=tmp_path / behaviour,
            max_output_bytes=1 << 20, labels={"org.tributary.spoke": "isolation"})
    journal.close()
    assert outcomes["ok"].output == {"ok": True, "case_id": "c-0123456789abcdef"}
    network = outcomes["network"].failure
    assert network is not None and "network access failed" in (network.log_tail or "")
    write = outcomes["write-input"].failure
    assert write is not None and "Read-only file system" in (write.log_tail or "")
    assert sorted(p.name for p in series.iterdir()) == ["1.dcm"]
    hang = outcomes["hang"].failure
    assert hang is not None and hang.reason == "timeout", hang
    assert not podman_containers(service_settings, "isolation")
