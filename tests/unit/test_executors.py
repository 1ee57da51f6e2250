"""The executor setting, the Slurm job script and the journal's record of batch jobs,
without any engine (the engines themselves: tests/e2e/test_executors_e2e.py)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from tributary.protocol.contract import ALGO_ARG_ENV, OUTPUT_DIR
from tributary.protocol.messages import ExperimentMessage, RunLimits
from tributary.spoke.config import RunnerSettings, SpokeConfig
from tributary.spoke.journal import Journal
from tributary.spoke.slurm import job_name, job_script

DIGEST = "sha256:" + "ab" * 32
IMAGE = f"127.0.0.1:5000/tributary/algo@{DIGEST}"


def _config(tmp_path: Path, execution: str) -> Path:
    path = tmp_path / "spoke.toml"
    path.write_text(f'spoke_id = "north"\ndata_dir = "data"\nwork_dir = "work"\n'
                    f'hub_public_key = "hub.pub"\n{execution}')
    return path


def test_engine_defaults_to_docker_and_slurm_paths_resolve(tmp_path: Path) -> None:
    assert SpokeConfig.load(_config(tmp_path, "")).execution.engine == "docker"
    config = SpokeConfig.load(_config(tmp_path, (
        '[execution]\nengine = "slurm"\n[execution.slurm]\npartition = "imaging"\n'
        'slurm_conf = "slurm/slurm.conf"\nshared_dir = "shared"\n')))
    assert config.execution.engine == "slurm"
    assert config.execution.slurm.slurm_conf == tmp_path / "slurm" / "slurm.conf"
    assert config.execution.slurm.shared_dir == tmp_path / "shared"
    assert config.execution.slurm.podman == ["podman"]


@pytest.mark.parametrize("execution", ['[execution]\nengine = "kubernetes"\n',
                                       '[execution]\nengine = "podman"\nsocket = "x"\n',
                                       '[execution.slurm]\npodman = []\n',
                                       '[execution]\nalgorithm_uid = 365533\n'])
def test_unknown_engines_and_settings_are_refused(tmp_path: Path, execution: str) -> None:
    with pytest.raises(ValidationError):
        SpokeConfig.load(_config(tmp_path, execution))


def _script(tmp_path: Path, arguments: dict[str, object]) -> str:
    case = tmp_path / "case dir"
    return job_script(["podman", "--root", str(tmp_path / "store")],
                      {"CONTAINERS_CONF": str(tmp_path / "containers.conf")},
                      job_name("north", "exp-1", "c-0123456789abcdef", 1), IMAGE,
                      case / "participant.json", case / "output",
                      {"/input/series/s-1": tmp_path / "store" / "s 1"}, arguments,
                      RunLimits(timeout_seconds=60, memory_mb=300, cpus=1.5),
                      RunnerSettings(pids_limit=99, tmpfs_mb=16), {"org.tributary.spoke": "north"},
                      case)


def test_job_script_runs_the_digest_with_the_runners_isolation(tmp_path: Path) -> None:
    script = _script(tmp_path, {"x": 1})
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    run_line = next(line for line in script.splitlines() if " run --name " in line)
    words = shlex.split(run_line.removesuffix(" &"))
    for flag in ("--network=none", "--read-only", "--user=65534:65534", "--cap-drop=ALL",
                 "--security-opt=no-new-privileges", "--pids-limit=99", "--memory=300m",
                 "--memory-swap=300m", "--cpus=1.5", "--pull=never",
                 "--tmpfs=/tmp:rw,noexec,nosuid,size=16m"):
        assert flag in words, flag
    assert words[-1] == IMAGE, "the image runs by its digest, nothing else"
    assert f"--volume={tmp_path / 'store' / 's 1'}:/input/series/s-1:ro" in words
    assert f"--volume={tmp_path / 'case dir' / 'output'}:{OUTPUT_DIR}:rw" in words
    assert "trap stop TERM INT" in script


def test_job_script_quotes_hostile_arguments(tmp_path: Path) -> None:
    """An argument is data: whatever its characters, the shell passes it as one word."""
    hostile = "'; touch /tmp/pwned; echo '$(id)`id`\"\\"
    script = _script(tmp_path, {"note": hostile})
    run_line = next(line for line in script.splitlines() if " run --name " in line)
    words = shlex.split(run_line.removesuffix(" &"))
    env = words[words.index("--env") + 1]
    assert env.startswith(f"{ALGO_ARG_ENV}=") and hostile in env.encode().decode(
        "unicode_escape")
    echoed = subprocess.run(["sh", "-c", f"printf '%s' {shlex.quote(env)}"],
                            capture_output=True, text=True).stdout
    assert echoed == env


def _experiment(experiment_id: str) -> ExperimentMessage:
    return ExperimentMessage.model_validate({
        "experiment_id": experiment_id, "spoke_id": "north",
        "algorithm": {"name": "a", "version": "1", "repository": "127.0.0.1:5000/a",
                      "digest": DIGEST}})


def test_journal_keeps_each_job_and_names_those_to_stop(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    for experiment_id in ("exp-1", "exp-2"):
        journal.add_experiment(_experiment(experiment_id))
        journal.settle_experiment(experiment_id, "accepted", None, None, ["c-1"], None)
    key = ("exp-1", "c-1", 1)
    assert journal.job(key) is None
    journal.job_intent(key, "tributary-north-exp-1-c-1-a1")
    assert journal.job(key) == ("tributary-north-exp-1-c-1-a1", None)
    journal.job_submitted(key, "42")
    assert journal.job(key) == ("tributary-north-exp-1-c-1-a1", "42")
    journal.job_intent(("exp-2", "c-1", 1), "tributary-north-exp-2-c-1-a1")
    assert journal.jobs_to_stop() == [], "queued cases keep their jobs"
    journal.cancel("exp-2", "wrong cohort", "m-1")
    stale = [(("exp-2", "c-1", 1), "tributary-north-exp-2-c-1-a1", None)]
    assert journal.jobs_to_stop() == stale, "cancelled: its queued case's job goes"
    journal.forget_job(stale[0][0])
    assert journal.jobs_to_stop() == [] and journal.job(("exp-2", "c-1", 1)) is None
    assert journal.job(key) == ("tributary-north-exp-1-c-1-a1", "42")
    journal.close()
