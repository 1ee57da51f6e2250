"""``tributary-algorithm test --training``: a training algorithm's image run round after
round on local sites, each run in the spoke's sandbox with the training contract's mounts
(cohort.json and the series read-only, the global model and round.json read-only, only the
output folder writable), the sites' updates combined with plain FedAvg in this process.

No hub, broker or object store: this shows the contract working, and an image that passes
here behaves the same under a spoke. Needs numpy and safetensors
(``pip install 'tributary-algorithm[training]'``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..contract import (
    COHORT_PATH,
    CONTRACT_VERSION,
    GLOBAL_MODEL_PATH,
    INPUT_ROOT,
    MODEL_DIR,
    OUTPUT_DIR,
    OUTPUT_PATH,
    PARAMETERS_PATH,
    ROUND_PATH,
    TRAINING_CONTRACT_VERSION,
    describe_exit_code,
)
from ..errors import AlgorithmError
from ..tensors import TensorFileError, Tensors, read_tensors, spec_of, write_tensors
from ..training import (
    EvaluateResult,
    FitResult,
    RoundConfig,
    RoundRecord,
    check_metrics,
    federated_average,
    round_seed,
)
from ._proc import ToolError
from .localrun import LocalParticipant, run_sandboxed, validate_output_file


@dataclass(frozen=True)
class SiteCase:
    """One case of a local site: pseudonym, series folders (as a participant) and labels."""

    case_id: str
    local: LocalParticipant
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSite:
    name: str
    cases: tuple[SiteCase, ...]


@dataclass
class TrainingRunResult:
    """One training run judged like a spoke judges it."""

    site: str
    task: str
    exit_code: int
    meaning: str
    duration_s: float
    stderr: str
    output: dict[str, Any] | None = None
    parameters: Tensors | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def cohort_json(site: TrainingSite, experiment_id: str = "local-training") -> tuple[
        dict[str, Any], list[tuple[Path, str]]]:
    """``cohort.json`` for ``site`` with each case's series under
    ``/tributary/input/case-NNN/series-MMM``, and the (host, container) mounts."""
    cases, mounts = [], []
    for i, case in enumerate(site.cases, start=1):
        by_target = dict((t, h) for h, t in case.local.mounts)
        series = []
        for j, item in enumerate(case.local.participant["series"], start=1):
            target = f"{INPUT_ROOT}/case-{i:03d}/series-{j:03d}"
            mounts.append((Path(by_target[item["path"]]), target))
            series.append({**item, "path": target})
        cases.append({"case_id": case.case_id, "series": series,
                      "labels": _scalars(case.labels)})
    return ({"contract_version": CONTRACT_VERSION,
             "training_contract_version": TRAINING_CONTRACT_VERSION,
             "experiment_id": experiment_id, "cases": cases}, mounts)


def _scalars(labels: Mapping[str, Any]) -> dict[str, Any]:
    """Labels as JSON scalars (a site's attributes file gives strings; numbers are read)."""
    out: dict[str, Any] = {}
    for key, value in labels.items():
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                with contextlib.suppress(ValueError):
                    value = float(value)
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
    return out


def _check_output(output: dict[str, Any], task: str) -> str | None:
    if output.get("task") != task:
        return f"output.json says task {output.get('task')!r}, the run was {task!r}"
    count = output.get("num_examples")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return "output.json: num_examples must be a non-negative integer"
    try:
        check_metrics(output.get("metrics") or {})
    except AlgorithmError as exc:
        return f"output.json: {exc.message}"
    return None


def run_training_task(image: str, site: TrainingSite, config: RoundConfig,
                      global_params: Tensors | None, *, arguments: Mapping[str, Any] | None
                      = None, timeout: float = 3600.0, memory_mb: int = 2048,
                      cpus: float = 1.0, pids_limit: int = 256, tmpfs_mb: int = 512,
                      docker: str = "docker") -> TrainingRunResult:
    """Run one training task of ``image`` on ``site`` in the sandbox, read back its
    output.json and (fit, init) its parameters strictly: a fit must return tensors with the
    global model's names, shapes and dtypes."""
    workdir = Path(tempfile.mkdtemp(prefix="tributary-train-"))
    name = f"tributary-train-{uuid.uuid4().hex[:12]}"
    try:
        cohort, series_mounts = cohort_json(site)
        (workdir / "cohort.json").write_text(json.dumps(cohort, indent=1))
        model = workdir / "model"
        model.mkdir()
        (model / "round.json").write_text(json.dumps(config.to_json()))
        if global_params is not None:
            write_tensors(model / "global.safetensors", global_params)
        out = workdir / "output"
        out.mkdir()
        for path in (workdir / "cohort.json", model / "round.json", model):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(out, 0o777)
        algo_arg = {"contract_version": CONTRACT_VERSION,
                    "training_contract_version": TRAINING_CONTRACT_VERSION,
                    "arguments": dict(arguments or {}), "cohort": COHORT_PATH,
                    "round": ROUND_PATH,
                    "model": GLOBAL_MODEL_PATH if global_params is not None else None,
                    "output": OUTPUT_PATH, "parameters": PARAMETERS_PATH}
        mounts = [(workdir / "cohort.json", COHORT_PATH, True), (model, MODEL_DIR, True)]
        mounts += [(host, target, True) for host, target in series_mounts]
        mounts.append((out, OUTPUT_DIR, False))
        run = run_sandboxed(image, mounts, json.dumps(algo_arg), workdir, name=name,
                            timeout=timeout, memory_mb=memory_mb, cpus=cpus,
                            pids_limit=pids_limit, tmpfs_mb=tmpfs_mb, docker=docker)
        result = TrainingRunResult(site.name, config.task, run.exit_code,
                                   describe_exit_code(run.exit_code), run.duration_s,
                                   run.stderr)
        if run.timed_out or run.exit_code != 0:
            result.problem = "timeout" if run.timed_out else f"exit {run.exit_code}"
            return result
        check = validate_output_file(out / "output.json")
        if check.output is None:
            result.problem = f"{check.problem}: {check.detail}"
            return result
        result.output = check.output
        result.problem = _check_output(check.output, config.task)
        if result.problem is None and config.task in ("fit", "init"):
            expected = spec_of(global_params) if global_params is not None else None
            try:
                result.parameters = read_tensors(out / "parameters.safetensors",
                                                 expected=expected)
            except TensorFileError as exc:
                result.problem = f"parameters: {exc}"
        return result
    finally:
        subprocess.run([docker, "rm", "--force", name], capture_output=True, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def train_test(image: str, sites: Sequence[TrainingSite], rounds: int,
               base: RoundConfig | None = None, initial: Tensors | None = None,
               report: Any = print, **run_options: Any) -> tuple[Tensors, list[RoundRecord]]:
    """Plain FedAvg over ``sites`` with every task in a container: init (unless
    ``initial``), then per round a fit on every site, the sample-weighted mean, and an
    evaluate of the new model on every site. Raises :class:`ToolError` at the first run a
    spoke would refuse."""
    base = base or RoundConfig(round=0)

    def run(site: TrainingSite, number: int, task: str, index: int,
            params: Tensors | None) -> TrainingRunResult:
        config = replace(base, round=number, task=task,
                         seed=round_seed(base.seed, number, index))
        result = run_training_task(image, site, config, params, **run_options)
        if not result.ok:
            raise ToolError(f"round {number} {task} at {site.name} failed: {result.problem}"
                            f"\n{result.stderr.strip()[-2000:]}")
        return result

    if initial is None:
        initial = run(sites[0], 0, "init", 0, None).parameters
        report(f"init: {sum(a.size for a in initial.values())} parameters in "
               f"{len(initial)} tensor(s) from the algorithm")
    params: Tensors = dict(initial or {})
    history = []
    for number in range(1, rounds + 1):
        fits = []
        for i, site in enumerate(sites):
            result = run(site, number, "fit", i, params)
            out = result.output or {}
            fits.append(FitResult(result.parameters or {}, out["num_examples"],
                                  dict(out.get("metrics") or {})))
        params = federated_average(fits)
        evals = []
        for i, site in enumerate(sites):
            out = run(site, number, "evaluate", i, params).output or {}
            evals.append(EvaluateResult(float(out.get("loss") or 0.0), out["num_examples"],
                                        dict(out.get("metrics") or {})))
        total = sum(e.num_examples for e in evals) or 1
        metrics = {k: sum(e.metrics[k] * e.num_examples for e in evals) / total
                   for k in sorted(set.intersection(*(set(e.metrics) for e in evals)))}
        record = RoundRecord(number, len(fits), None,
                             sum(e.loss * e.num_examples for e in evals) / total, metrics)
        history.append(record)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        report(f"round {number}: {len(fits)} site(s), evaluation loss {record.eval_loss:.4g}"
               + (f", {shown}" if shown else ""))
    return params, history
