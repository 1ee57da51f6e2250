"""A training round's local run inside the spoke agent, under the validation path's trust
chain: the image named by digest must carry the hub's approval and (when the site pins
publishers) a trusted publisher's release signature, is pulled from an allowed registry by
digest, and runs on the spoke's engine with the same isolation as a case (no network,
read-only root and inputs, no capabilities, user 65534, the site's limits). The cohort is
the site's de-identified catalog, known to the algorithm by ids released for the study
only; its labels are the attributes the site's ``[training] label_attributes`` allows.
What comes back (output.json, the parameters) is read as hostile.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import docker.errors
import numpy as np
import requests.exceptions

from tributary.protocol.contract import ALGO_ARG_ENV, INPUT_ROOT, OUTPUT_DIR
from tributary.protocol.messages import AlgorithmRef, FailureReason, RunLimits
from tributary.protocol.signing import PublicKey
from tributary.protocol.training import rounds as msg
from tributary.protocol.training.contract import (
    COHORT_PATH,
    GLOBAL_MODEL_PATH,
    RoundSpec,
    TrainingAlgoArg,
    TrainingCase,
    TrainingCohort,
    TrainingOutput,
)
from tributary.protocol.training.tensors import (
    TensorFileError,
    read_tensors,
    spec_of,
    write_tensors,
)
from tributary.spoke import output_quota
from tributary.spoke.case_ids import ReleasedCaseIds
from tributary.spoke.config import SpokeConfig
from tributary.spoke.engines import engine_client
from tributary.spoke.images import (
    ImageRefused,
    RegistryAccess,
    check_approval,
    check_release,
    ensure_image,
)
from tributary.spoke.ingest import open_catalog, refresh_catalog, series_folders
from tributary.spoke.runner import (
    SPOKE_LABEL,
    container_options,
    prepare_case_dir,
    read_output,
    remove_container,
)
from tributary.spoke.training import LocalResult, TrainingRefused

log = logging.getLogger(__name__)
Audit = Callable[..., None]
#: output.json of a training run: small, as for a case.
OUTPUT_LIMIT_BYTES = 64 * 1024


def _name(text: str) -> str:
    """A container name fragment from a study or round id."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:60]


class SpokeTrainer:
    """Admits a round's image and runs the training task (``__call__``, as
    :class:`~tributary.spoke.training.TrainingParticipant` expects)."""

    def __init__(self, config: SpokeConfig, hub_keys: list[PublicKey],
                 publishers: Callable[[], list[PublicKey]], registry: RegistryAccess,
                 audit: Audit, revoked: Callable[[str], str | None] = lambda _d: None) -> None:
        self.config = config
        self.hub_keys = hub_keys
        self.publishers = publishers
        self.registry = registry
        self.audit = audit
        self.revoked = revoked
        self.case_ids = ReleasedCaseIds.from_key_file(config.work_dir / "case-id.key",
                                                      config.spoke_id)

    # -- admission ------------------------------------------------------------------------
    def admit(self, message: msg.RoundOpen) -> str:
        """The local image id of the round's image, pulled and verified; raises
        :class:`TrainingRefused` (reason ``image_not_trusted`` or ``image_unavailable``)."""
        ref = message.image
        try:
            if ref is None:
                raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                                   "the round names no approved image")
            if ref.reference != message.algorithm:
                raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                                   f"the approved image {ref.reference} is not the round's "
                                   f"{message.algorithm}")
            check_approval(ref, self.hub_keys)
            revoked = self.revoked(ref.digest)
            if revoked is not None:
                raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                                   f"approval revoked by the hub: {revoked}")
            publisher = check_release(ref, self.publishers(),
                                      self.config.runner.allowed_registries,
                                      self.config.trust.registry_signatures, self.registry)
            image_id = self._pull(ref)
        except ImageRefused as exc:
            reason = exc.reason.value
            kind = ("image_unavailable" if exc.reason == FailureReason.IMAGE_UNAVAILABLE
                    else "image_not_trusted")
            self.audit("image.verified", message.algorithm, result="refused", reason=reason,
                       error=exc.detail, study=message.study_id, round=message.round_index)
            raise TrainingRefused(f"{reason}: {exc.detail}", kind) from None
        self.audit("image.verified", message.algorithm, result="verified", image_id=image_id,
                   publisher=publisher, study=message.study_id, round=message.round_index)
        return image_id

    def _pull(self, ref: AlgorithmRef) -> str:
        try:
            client = engine_client(self.config.execution)
        except docker.errors.DockerException as exc:
            raise ImageRefused(FailureReason.IMAGE_UNAVAILABLE,
                               f"the container engine is unavailable: {exc}") from None
        try:
            return ensure_image(client, ref, self.config.runner.allowed_registries,
                                on_pull=lambda pulled: self.audit("image.pulled", ref.reference,
                                                                  image_id=pulled),
                                access=self.registry)
        finally:
            client.close()

    # -- the cohort -----------------------------------------------------------------------
    def cohort(self, study_id: str) -> tuple[TrainingCohort, dict[str, Path]]:
        """Every case of the catalog (after an incremental ingest) with its de-identified
        series and allowed labels, by ids released for ``study_id``; and the host folder
        to mount at each container path."""
        allowed = set(self.config.training.label_attributes)
        cases, mounts = [], {}
        with open_catalog(self.config) as catalog:
            refresh_catalog(self.config, catalog, self.audit, study_id)
            catalogued = catalog.cases()
        for i, case in enumerate(catalogued, start=1):
            folders = series_folders(self.config, [s.series_id for s in case.series])
            series = []
            for j, s in enumerate(case.series, start=1):
                path = f"{INPUT_ROOT}/case-{i:03d}/series-{j:03d}"
                mounts[path] = folders[s.series_id]
                series.append({"series_id": self.case_ids.released_series(study_id,
                                                                          s.series_id),
                               "modality": s.modality, "path": path,
                               "instance_count": s.instance_count, "rows": s.rows,
                               "columns": s.columns, "body_part": s.body_part})
            labels = {k: v for k, v in case.attributes.items()
                      if k in allowed and isinstance(v, (bool, int, float, str))}
            cases.append(TrainingCase(case_id=self.case_ids.released(study_id, case.case_id),
                                      series=series, labels=labels))
        return TrainingCohort(experiment_id=study_id, cases=cases), mounts

    # -- the run --------------------------------------------------------------------------
    def __call__(self, message: msg.RoundOpen,
                 params: Mapping[str, np.ndarray]) -> LocalResult:
        image_id = self.admit(message)
        cohort, series = self.cohort(message.study_id)
        if not cohort.cases:
            raise TrainingRefused("the site's catalog holds no case to train on",
                                  "training_failed")
        settings = self.config.training
        limits = RunLimits(timeout_seconds=min(settings.timeout_seconds,
                                               self.config.runner.max_timeout_seconds),
                           memory_mb=min(settings.memory_mb, self.config.runner.max_memory_mb),
                           cpus=min(settings.cpus, self.config.runner.max_cpus))
        name = (f"tributary-{self.config.spoke_id}-train-{_name(message.study_id)}"
                f"-r{message.round_index}-a{message.attempt}")
        run_dir = self.config.work_dir / "runs" / name
        out_dir = prepare_case_dir(run_dir, self.config.runner,
                                   owner=self.config.execution.algorithm_uid)
        if not isinstance(out_dir, Path):
            raise TrainingRefused(f"the output folder could not be prepared: "
                                  f"{out_dir.failure.detail if out_dir.failure else ''}",
                                  "training_failed")
        try:
            return self._run(message, image_id, cohort, series, params, limits, name,
                             run_dir, out_dir)
        finally:
            output_quota.unmount(out_dir)
            shutil.rmtree(run_dir, ignore_errors=True)

    def _run(self, message: msg.RoundOpen, image_id: str, cohort: TrainingCohort,
             series: dict[str, Path], params: Mapping[str, np.ndarray], limits: RunLimits,
             name: str, run_dir: Path, out_dir: Path) -> LocalResult:
        model_dir = run_dir / "model"
        model_dir.mkdir()
        (run_dir / "cohort.json").write_text(cohort.model_dump_json())
        spec = RoundSpec(study_id=message.study_id, round=message.round_index + 1, task="fit",
                         strategy=message.strategy, proximal_mu=message.proximal_mu,
                         seed=int.from_bytes(np.random.default_rng().bytes(4), "big"))
        (model_dir / "round.json").write_text(spec.model_dump_json())
        write_tensors(model_dir / "global.safetensors", dict(params))
        for path in (run_dir / "cohort.json", model_dir / "round.json",
                     model_dir / "global.safetensors"):
            path.chmod(0o644)
        model_dir.chmod(0o755)
        run_dir.chmod(0o755)
        volumes = {str(run_dir / "cohort.json"): {"bind": COHORT_PATH, "mode": "ro"},
                   str(model_dir): {"bind": str(Path(GLOBAL_MODEL_PATH).parent), "mode": "ro"},
                   str(out_dir): {"bind": OUTPUT_DIR, "mode": "rw"}}
        volumes.update({str(host): {"bind": path, "mode": "ro"} for path, host in series.items()})
        labels = {SPOKE_LABEL: self.config.spoke_id, "org.tributary.training": message.study_id,
                  "org.tributary.round": str(message.round_index)}
        options = container_options(name, {}, limits, self.config.runner, volumes, labels)
        options["environment"] = {ALGO_ARG_ENV: TrainingAlgoArg().model_dump_json()}
        client = engine_client(self.config.execution)
        try:
            remove_container(client, name)
            container = client.containers.create(image_id, **options)
            container.start()
            self.audit("container.started", name, container_id=container.id,
                       image=message.algorithm, study=message.study_id,
                       round=message.round_index, attempt=message.attempt,
                       limits={"memory_mb": limits.memory_mb, "cpus": limits.cpus,
                               "timeout_seconds": limits.timeout_seconds, "network": "none",
                               "read_only": True, "cases": len(cohort.cases)})
            try:
                status = int(container.wait(timeout=limits.timeout_seconds)
                             .get("StatusCode", -1))
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                with contextlib.suppress(docker.errors.APIError):
                    container.kill()
                status = -1
            self.audit("container.finished", name, exit_code=status, study=message.study_id,
                       round=message.round_index)
        finally:
            remove_container(client, name)
            client.close()
        if status != 0:
            raise TrainingRefused(f"the training run exited with status {status}",
                                  "training_failed")
        return read_result(out_dir, params)


def read_result(out_dir: Path, params: Mapping[str, np.ndarray]) -> LocalResult:
    """The run's output.json and parameters, read strictly: a small JSON object of the
    training contract for a fit, and tensors exactly like the global model's."""
    try:
        output = TrainingOutput.model_validate(read_output(out_dir / "output.json",
                                                           OUTPUT_LIMIT_BYTES))
        if output.task != "fit":
            raise ValueError(f"output.json says task {output.task}, the run was fit")
        parameters = read_tensors(out_dir / "parameters.safetensors",
                                  expected=spec_of(dict(params)))
    except (ValueError, TensorFileError) as exc:
        raise TrainingRefused(f"the training run's output is refused: {exc}"[:2000],
                              "training_failed") from None
    except Exception as exc:  # read_output's OutputError and the like
        raise TrainingRefused(f"the training run's output is refused: "
                              f"{getattr(exc, 'detail', exc)}"[:2000], "training_failed") from None
    return LocalResult(parameters, output.num_examples, output.loss)

