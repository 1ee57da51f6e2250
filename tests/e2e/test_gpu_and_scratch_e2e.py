"""GPUs and /tmp reach the container engine as the study asked, after the site's caps:
checked on the real engine by inspecting the created container (no GPU needed), and a
case asking for GPUs on an engine without a GPU driver fails saying so, leaving nothing."""

from __future__ import annotations

import uuid
from pathlib import Path

import docker
import docker.errors
import pytest

from tributary.protocol.contract import Participant
from tributary.protocol.messages import FailureReason, RunLimits
from tributary.spoke.config import RunnerSettings
from tributary.spoke.runner import container_options, effective_limits, run_case

pytestmark = pytest.mark.e2e


def _host_config(image: str, limits: RunLimits, settings: RunnerSettings) -> dict:
    client = docker.from_env()
    name = f"tributary-test-{uuid.uuid4().hex[:10]}"
    container = client.containers.create(
        image, **container_options(name, {}, limits, settings, {}, {}))
    try:
        container.reload()
        return container.attrs["HostConfig"]
    finally:
        container.remove(force=True)


def test_gpus_and_tmp_reach_the_engine(misbehaving_image: tuple[str, str]) -> None:
    image = f"{misbehaving_image[0]}@{misbehaving_image[1]}"
    site = RunnerSettings(max_gpus=2, max_tmp_mb=64)
    limits = effective_limits(RunLimits(gpus=2, tmp_mb=10_000), site)
    host = _host_config(image, limits, site)
    [request] = host["DeviceRequests"]
    assert request["Count"] == 2 and request["Capabilities"] == [["gpu"]]
    assert host["Tmpfs"]["/tmp"].endswith("size=64m"), host["Tmpfs"]  # capped by the site
    default = RunnerSettings()
    plain = _host_config(image, effective_limits(RunLimits(), default), default)
    assert not plain.get("DeviceRequests")
    assert plain["Tmpfs"]["/tmp"].endswith("size=512m")  # the site's default


def test_a_gpu_case_on_an_engine_without_gpus_fails_clearly(
        misbehaving_image: tuple[str, str], tmp_path: Path) -> None:
    client = docker.from_env()
    if any("nvidia" in r for r in (client.info().get("Runtimes") or {})):
        pytest.skip("this engine has a GPU runtime")
    name = f"tributary-test-{uuid.uuid4().hex[:10]}"
    outcome = run_case(
        client, f"{misbehaving_image[0]}@{misbehaving_image[1]}", name=name,
        participant=Participant(case_id="c-0123456789abcdef", experiment_id="exp-gpu",
                                series=[]),
        mounts={}, arguments={"behaviour": "ok"},
        limits=RunLimits(timeout_seconds=60, memory_mb=256, cpus=1.0, gpus=1),
        settings=RunnerSettings(max_gpus=1), case_dir=tmp_path / "case",
        max_output_bytes=1024 * 1024, labels={})
    assert outcome.failure is not None, outcome
    assert outcome.failure.reason == FailureReason.INTERNAL_ERROR
    assert "could not start the container" in outcome.failure.detail
    assert "gpu" in outcome.failure.detail.lower(), outcome.failure.detail
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(name)
