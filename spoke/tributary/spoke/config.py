"""The spoke's configuration file (TOML). Everything that decides what may leave the
institution lives here, at the site, never on the hub."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from tributary.protocol.contract import DEFAULT_OUTPUT_LIMIT_BYTES
from tributary.protocol.identifiers import validate_spoke_id
from tributary.spoke.cores import usable_cores
from tributary.spoke.deid.options import DeidOptions

if TYPE_CHECKING:  # the broker client (stomp, ssl): loaded by what connects, not by ingest
    from tributary.protocol.broker import BrokerSettings

log = logging.getLogger(__name__)


class ReleasePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Case attributes (from ``attributes_file``) that may leave with a result when a study
    #: asks for them. Anything not listed never leaves.
    releasable_attributes: list[str] = Field(default_factory=list)
    #: CSV (or JSON) file of case attributes keyed by the institution's patient ID, relative
    #: to ``data_dir`` (or to this file when there is no ``data_dir``); see docs/data.md.
    attributes_file: str | None = None
    max_output_bytes: int = Field(DEFAULT_OUTPUT_LIMIT_BYTES, ge=1024, le=64 * 1024 * 1024)
    #: Send a failed case's log tail to the hub. False withholds it: the result then says
    #: the site withheld it (``log_withheld``), and the dashboard says so.
    log_tails: bool = True


class RunnerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Upper bounds; an experiment may ask for less, never for more.
    max_memory_mb: int = Field(8192, ge=64)
    max_timeout_seconds: int = Field(24 * 3600, ge=1)
    max_cpus: float = Field(2.0, gt=0)
    pids_limit: int = 256
    #: Size of each case's /tmp when the study asks for none; ``max_tmp_mb`` caps what a
    #: study may ask for (a tmpfs: it counts against the case's memory).
    tmpfs_mb: int = Field(512, ge=1)
    max_tmp_mb: int = Field(4096, ge=1)
    #: GPUs one case may use (Docker engine: device requests; Slurm: ``--gres=gpu:N``);
    #: 0, the default, refuses every study asking for a GPU, saying so.
    max_gpus: int = Field(0, ge=0, le=64)
    #: Size of each case's output folder (a tmpfs the spoke mounts, counted against the
    #: case's memory limit): an algorithm writing past it fails, the spoke's disk holding
    #: its journal and audit log is never touched. 0 turns the quota off (the folder then
    #: lies on the spoke's disk), for spokes that cannot mount (no CAP_SYS_ADMIN).
    output_quota_mb: int = Field(64, ge=0, le=65536)
    #: Registries images may come from (host[:port]); empty means any.
    allowed_registries: list[str] = Field(default_factory=list)
    log_tail_lines: int = 40


class SlurmSettings(BaseModel):
    """How cases reach a Slurm cluster (``[execution.slurm]``): each case is one batch job
    that runs the verified image by digest with Podman on a compute node."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    #: More ``sbatch`` options, as the site's cluster needs them (e.g. ``--constraint=x``).
    sbatch_options: list[str] = Field(default_factory=list)
    #: The Podman ``--device`` that gives a case's container the GPUs of its job (asked
    #: with ``--gres=gpu:N``): a CDI name the compute nodes define.
    gpu_device: str = Field("nvidia.com/gpu=all", min_length=1)
    #: The Slurm configuration the spoke's ``sbatch``/``squeue``/``scancel`` use (sets
    #: ``SLURM_CONF``); unset, Slurm's own default.
    slurm_conf: Path | None = None
    #: The Podman command on the compute nodes, with any global options
    #: (e.g. ``["podman", "--storage-driver", "overlay"]``).
    podman: list[str] = Field(default_factory=lambda: ["podman"], min_length=1)
    #: Environment for Podman in the job (e.g. ``CONTAINERS_CONF``, ``CONTAINERS_REGISTRIES_CONF``).
    podman_env: dict[str, str] = Field(default_factory=dict)
    #: Folder on the filesystem the compute nodes share with the spoke, for each case's
    #: participant file, output folder, exit status and log (default: ``work_dir/runs``).
    #: The de-identified store must be on a shared filesystem too (same path everywhere).
    shared_dir: Path | None = None
    #: Memory Slurm reserves for Podman itself, on top of the case's memory limit.
    memory_overhead_mb: int = Field(256, ge=0)
    #: How often the spoke asks Slurm (``squeue``) about each running case's job; a
    #: finished case is noticed sooner, from the status its job writes.
    poll_seconds: float = Field(5.0, ge=0.1, le=600)


class ExecutionSettings(BaseModel):
    """Where cases run (``[execution]``): the local Docker engine, Podman through its
    Docker-compatible API socket (rootless if the site starts it so), or a Slurm cluster.
    The isolation flags, limits and image checks are the same on each."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["docker", "podman", "slurm"] = "docker"
    #: Podman's API socket (``podman system service``), for ``engine = "podman"``; a
    #: rootless Podman serves one under ``$XDG_RUNTIME_DIR/podman/podman.sock``.
    podman_socket: str = "unix:///run/podman/podman.sock"
    #: The host uid (and gid) the algorithm's user 65534 appears as, which must own each
    #: case's output folder: 65534 for Docker and rootful Podman; for rootless Podman
    #: started by a user whose subordinate range starts at S (``/etc/subuid``), S + 65533.
    algorithm_uid: int = Field(65534, ge=1)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)


class TrustSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Publisher public keys (PEM files) this site trusts. When any is listed, only images
    #: whose manifest digest one of them signed are pulled and run.
    publisher_keys: list[Path] = Field(default_factory=list)
    #: When an experiment carries no release signature, look for one beside the image in
    #: its registry (cosign's attestation layout), so a publisher's releases are trusted by
    #: key alone, with no digest pinned by hand.
    registry_signatures: bool = True
    #: A sandbox spoke: it holds synthetic data only and also runs the hub's sandbox grants
    #: (a version registered but not yet reviewed, for its own developer). Never set this
    #: on a spoke with real data: it is what lets unreviewed code in.
    sandbox: bool = False


class StewardPolicy(BaseModel):
    """Optional human gates a site can switch on; decisions are taken with
    ``tributary spoke steward`` and wait durably in the spoke's work folder."""

    model_config = ConfigDict(extra="forbid")

    #: A local data steward approves each experiment before anything runs.
    approve_experiments: bool = False
    #: A local data steward reviews each result (its output.json) before it is released.
    review_results: bool = False


class CountPolicy(BaseModel):
    """Federated counts: how many cases match a selection, never which ones."""

    model_config = ConfigDict(extra="forbid")

    #: Answer count requests at all.
    enabled: bool = True
    #: Small-cell suppression: a count below this is reported only as "fewer than k".
    min_cell: int = Field(5, ge=1, le=1000)
    #: Counts each requester may ask in ``budget_days`` (refused ones included).
    query_budget: int = Field(100, ge=1, le=100_000)
    budget_days: int = Field(30, ge=1, le=3650)


class CohortsSettings(BaseModel):
    """Cohorts across institutions: the identifier spokes agree on for private set
    intersection (docs/cohorts.md)."""

    model_config = ConfigDict(extra="forbid")

    #: Attribute of ``attributes_file`` holding the identifier the sites agree on (a
    #: national or consortium patient ID). Its values never leave the spoke; it may not
    #: also be releasable. Unset: the spoke refuses PSI requests.
    link_identifier: str | None = Field(None, min_length=1, max_length=200)
    #: The site's data steward approves each PSI request (``tributary spoke steward psi``).
    approve_psi: bool = True


class LivenessSettings(BaseModel):
    """How the spoke shows it is alive and how hard it tries before giving a case up."""

    model_config = ConfigDict(extra="forbid")

    #: Seconds between heartbeats to the hub (version, capacity, queue depth, current work).
    heartbeat_seconds: float = Field(30.0, ge=0.5, le=3600)
    #: At most one progress message per running case this often.
    progress_seconds: float = Field(5.0, ge=0.2, le=3600)
    #: A case whose container was started this many times without finishing (the spoke
    #: crashed or was killed each time) fails as ``interrupted`` instead of running again.
    max_launches: int = Field(3, ge=1, le=100)


class TrainingSettings(BaseModel):
    """Federated training (``[training]``): off unless the site turns it on. The agent
    then takes part in training studies whose image passes the same checks as a validation
    study's, trains on its de-identified catalog, and releases only protected, masked
    updates (docs/training.md)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    #: The most epsilon (at the study's delta) this site ever spends on one study; a round
    #: that would take it further is refused. None: no cap of the site's own.
    max_epsilon_per_study: float | None = Field(None, gt=0, allow_inf_nan=False)
    #: This spoke's object store credentials file (from the hub's administrator): it may
    #: read global models and write only its own round objects.
    objectstore_credentials: Path | None = None
    #: Case attributes a training algorithm may read as labels (inside the sandbox only;
    #: labels never leave the spoke). Others are not given to it.
    label_attributes: list[str] = Field(default_factory=list)
    #: Case attributes a vertical study may use as its columns or label at this site (read
    #: inside the spoke only; never sent): a study naming any other is refused. Empty: the
    #: spoke takes part in no vertical study (docs/cohorts.md).
    vertical_attributes: list[str] = Field(default_factory=list)
    #: Whether the training loss on this site's cases leaves with each round (in clear,
    #: beside the sample count: one number a round, outside the differential-privacy
    #: guarantee, so off unless the site allows it; the dashboard's loss curve needs it).
    release_loss: bool = False
    #: Limits of one training run (all of the site's cases at once).
    timeout_seconds: int = Field(3600, ge=1)
    memory_mb: int = Field(2048, ge=64)
    cpus: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _credentials_when_enabled(self) -> TrainingSettings:
        if self.enabled and self.objectstore_credentials is None:
            raise ValueError("[training] enabled needs objectstore_credentials")
        return self


class SpokeBroker(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = 61613
    user: str | None = None
    password: SecretStr | None = None
    #: Mutual TLS: the broker CA and this spoke's certificate and key
    #: (from `tributary broker config`, identities/<spoke_id>/).
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Queue namespace shared with the hub (one broker may carry several federations).
    federation: str = "tributary"

    def settings(self) -> BrokerSettings:
        from tributary.protocol.broker import BrokerSettings

        return BrokerSettings(host=self.host, port=self.port, user=self.user,
                              password=self.password, ca_file=self.ca_file,
                              cert_file=self.cert_file, key_file=self.key_file,
                              federation=self.federation)


class SpokeRegistry(BaseModel):
    """How this spoke reaches a TLS registry with per-party access (``[registry]``)."""

    model_config = ConfigDict(extra="forbid")

    #: The federation CA the registry's certificate is checked against (also written for
    #: the Docker engine and Podman: `tributary.services.registry.trust_ca`).
    ca_file: Path | None = None
    #: The registry's token service name (the hub's ``registry_token_service``): set, the
    #: spoke authenticates as itself with short-lived assertions signed by its enrolled key
    #: (no password to keep). Unset: anonymous, for an open loopback registry.
    token_service: str | None = None


class FolderSource(BaseModel):
    """DICOM files under a local folder, in any layout."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["folder"] = "folder"
    #: Short name shown in the catalog and the exclusions list.
    name: str = Field("data", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    path: Path


class DicomWebSource(BaseModel):
    """A PACS (or VNA) over DICOMweb: QIDO-RS to find instances, WADO-RS to retrieve."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["dicomweb"] = "dicomweb"
    name: str = Field("pacs", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    #: Service root, e.g. https://pacs.example.org/dicom-web
    url: str = Field(pattern=r"^https?://")
    username: str | None = None
    password: SecretStr | None = None
    #: CA bundle for a PACS with a private certificate authority.
    ca_file: Path | None = None
    timeout_seconds: float = Field(60, gt=0)


DataSource = Annotated[FolderSource | DicomWebSource, Field(discriminator="kind")]


class CatalogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Ingest new inputs from the sources (incrementally) before selecting an experiment's
    #: cohort or counting for a federated count or the steward; the alternative is running
    #: `tributary spoke ingest` on a schedule.
    ingest_before_selection: bool = True
    #: Processes that de-identify local files in parallel: the ingesting process and
    #: ``workers - 1`` worker processes (it stores and catalogues between its own files).
    #: By default one per CPU this process may use (its affinity, as a container or a
    #: batch system sets it), at most 8.
    workers: int = Field(default_factory=lambda: max(1, min(8, usable_cores())),
                         ge=1, le=64)
    #: Publish the site's description (the federated catalog: counts with small cells
    #: suppressed, years, de-identification profile, release terms, releasable attribute
    #: names) to the hub; checked this often, and sent only when it changed.
    publish_description: bool = True
    description_check_seconds: float = Field(60.0, ge=0.5, le=86400)


class SpokeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spoke_id: str
    #: Shorthand for a folder source named "data" (besides any ``[[sources]]``).
    data_dir: Path | None = None
    work_dir: Path
    #: The hub's public key (PEM), pinned here: only messages it signed are obeyed.
    hub_public_key: Path
    concurrency: int = Field(2, ge=1, le=64)
    broker: SpokeBroker = Field(default_factory=SpokeBroker)
    registry: SpokeRegistry = Field(default_factory=SpokeRegistry)
    policy: ReleasePolicy = Field(default_factory=ReleasePolicy)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    execution: ExecutionSettings = Field(default_factory=ExecutionSettings)
    trust: TrustSettings = Field(default_factory=TrustSettings)
    steward: StewardPolicy = Field(default_factory=StewardPolicy)
    counts: CountPolicy = Field(default_factory=CountPolicy)
    cohorts: CohortsSettings = Field(default_factory=CohortsSettings)
    liveness: LivenessSettings = Field(default_factory=LivenessSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    #: Where the de-identified store and catalog take their DICOM from.
    sources: list[DataSource] = Field(default_factory=list)
    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    #: PS3.15 options the store's instances are de-identified under (all off: the Basic
    #: Profile); custody records state them. Changing them needs `ingest --rebuild`.
    deidentification: DeidOptions = Field(default_factory=DeidOptions)

    _id = field_validator("spoke_id")(validate_spoke_id)

    @model_validator(mode="after")
    def _has_sources(self) -> SpokeConfig:
        if self.data_dir is None and not self.sources:
            raise ValueError("configure data_dir or at least one [[sources]] entry")
        names = [s.name for s in self.all_sources]
        if len(names) != len(set(names)):
            raise ValueError(f"source names must be unique, got {names}")
        link = self.cohorts.link_identifier
        if link is not None and link in self.policy.releasable_attributes:
            raise ValueError(f"[cohorts] link_identifier {link!r} is also a releasable "
                             "attribute: the agreed identifier must never leave the spoke")
        if self.execution.algorithm_uid != 65534 and self.runner.output_quota_mb:
            raise ValueError("a rootless Podman (execution.algorithm_uid set) does not see "
                             "the output quota's tmpfs: set runner.output_quota_mb = 0")
        return self

    @property
    def all_sources(self) -> list[FolderSource | DicomWebSource]:
        """``data_dir`` (as a folder source named "data") and every ``[[sources]]`` entry."""
        folder = [FolderSource(name="data", path=self.data_dir)] if self.data_dir else []
        return [*folder, *self.sources]

    @property
    def attributes_path(self) -> Path | None:
        if not self.policy.attributes_file:
            return None
        path = Path(self.policy.attributes_file)
        return path if path.is_absolute() else (self.data_dir or Path.cwd()) / path

    @classmethod
    def load(cls, path: Path) -> SpokeConfig:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
        base = path.parent
        for key in ("data_dir", "work_dir", "hub_public_key"):
            if key in raw and not Path(raw[key]).is_absolute():
                raw[key] = str((base / raw[key]).resolve())
        registry = raw.get("registry", {})
        if registry.get("ca_file") and not Path(registry["ca_file"]).is_absolute():
            registry["ca_file"] = str((base / registry["ca_file"]).resolve())
        slurm = raw.get("execution", {}).get("slurm", {})
        for key in ("slurm_conf", "shared_dir"):
            if slurm.get(key) and not Path(slurm[key]).is_absolute():
                slurm[key] = str((base / slurm[key]).resolve())
        for source in raw.get("sources", []):
            for key in ("path", "ca_file"):
                if key in source and not Path(source[key]).is_absolute():
                    source[key] = str((base / source[key]).resolve())
        training = raw.get("training", {})
        creds = training.get("objectstore_credentials")
        if creds and not Path(creds).is_absolute():
            training["objectstore_credentials"] = str((base / creds).resolve())
        policy = raw.get("policy", {})
        attributes = policy.get("attributes_file")
        if attributes and not Path(attributes).is_absolute():
            policy["attributes_file"] = str(Path(raw.get("data_dir") or base) / attributes)
        if "trust" in raw:
            raw["trust"]["publisher_keys"] = [str((base / p).resolve()) for p in
                                              raw["trust"].get("publisher_keys", [])]
        config = cls.model_validate(raw)
        secret = any(getattr(s, "password", None) for s in config.sources) or (
            config.broker.password is not None)
        if secret and path.stat().st_mode & 0o077:
            log.warning("%s holds passwords but is readable by other users; chmod 600 it",
                        path)
        return config
