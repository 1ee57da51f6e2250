"""Studies may ask for GPUs and a /tmp size; the site caps /tmp and refuses a GPU study it
cannot serve, naming why, instead of running it without."""

import shlex
from pathlib import Path

import pytest
from pydantic import ValidationError

from tributary.protocol.messages import RunLimits
from tributary.spoke.config import RunnerSettings
from tributary.spoke.runner import effective_limits, limits_refusal
from tributary.spoke.slurm import job_script


def test_tmp_is_the_studys_size_capped_by_the_site() -> None:
    site = RunnerSettings(tmpfs_mb=512, max_tmp_mb=1024)
    assert effective_limits(RunLimits(), site).tmp_mb == 512
    assert effective_limits(RunLimits(tmp_mb=100), site).tmp_mb == 100
    assert effective_limits(RunLimits(tmp_mb=50_000), site).tmp_mb == 1024


def test_a_site_without_gpus_refuses_a_gpu_study_saying_why() -> None:
    reason = limits_refusal(RunLimits(gpus=1), RunnerSettings(), "docker")
    assert reason is not None and "offers none" in reason and "max_gpus" in reason
    assert limits_refusal(RunLimits(), RunnerSettings(), "docker") is None


def test_more_gpus_than_the_site_offers_is_refused() -> None:
    site = RunnerSettings(max_gpus=2)
    assert limits_refusal(RunLimits(gpus=2), site, "docker") is None
    assert limits_refusal(RunLimits(gpus=2), site, "slurm") is None
    reason = limits_refusal(RunLimits(gpus=4), site, "docker")
    assert reason is not None and "at most 2" in reason


def test_podman_refuses_gpus_clearly() -> None:
    reason = limits_refusal(RunLimits(gpus=1), RunnerSettings(max_gpus=1), "podman")
    assert reason is not None and "Podman" in reason


def test_limits_are_bounded() -> None:
    with pytest.raises(ValidationError):
        RunLimits(gpus=-1)
    with pytest.raises(ValidationError):
        RunLimits(tmp_mb=0)


def test_slurm_job_gives_the_container_its_gpus_and_tmp(tmp_path: Path) -> None:
    def run_words(limits: RunLimits) -> list[str]:
        script = job_script(["podman"], {}, "job", "reg/x@sha256:" + "a" * 64,
                            tmp_path / "p.json", tmp_path / "out", {}, {}, limits,
                            RunnerSettings(max_gpus=2), {}, tmp_path, "nvidia.com/gpu=all")
        line = next(line for line in script.splitlines() if " run --name " in line)
        return shlex.split(line.removesuffix(" &"))

    words = run_words(RunLimits(gpus=2, tmp_mb=100))
    assert "--device=nvidia.com/gpu=all" in words
    assert "--tmpfs=/tmp:rw,noexec,nosuid,size=100m" in words
    assert not any(w.startswith("--device") for w in run_words(RunLimits()))
