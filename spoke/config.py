"""The spoke's configuration file (TOML). Everything that decides what may leave the
institution lives here, at the site, never on the hub."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from tributary.protocol.broker import BrokerSettings
from tributary.protocol.contract import DEFAULT_OUTPUT_LIMIT_BYTES
from tributary.protocol.messages import validate_spoke_id


class ReleasePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Case attributes (from ``attributes_file``) that may leave with a result when a study
    #: asks for them. Anything not listed never leaves.
    releasable_attributes: list[str] = Field(default_factory=list)
    #: JSON file mapping each case folder to its attributes, relative to ``data_dir``.
    attributes_file: str | None = None
    max_output_bytes: int = Field(DEFAULT_OUTPUT_LIMIT_BYTES, ge=1024, le=64 * 1024 * 1024)


class RunnerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Upper bounds; an experiment may ask for less, never for more.
    max_memory_mb: int = Field(8192, ge=64)
    max_timeout_seconds: int = Field(24 * 3600, ge=1)
    max_cpus: float = Field(2.0, gt=0)
    pids_limit: int = 256
    tmpfs_mb: int = 512
    #: Registries images may come from (host[:port]); empty means any.
    allowed_registries: list[str] = Field(default_factory=list)
    log_tail_lines: int = 40


class TrustSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Publisher public keys (PEM files) this site trusts. When any is listed, only images
    #: whose manifest digest one of them signed are pulled and run.
    publisher_keys: list[Path] = Field(default_factory=list)


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
        return BrokerSettings(host=self.host, port=self.port, user=self.user,
                              password=self.password, ca_file=self.ca_file,
                              cert_file=self.cert_file, key_file=self.key_file,
                              federation=self.federation)


class SpokeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spoke_id: str
    data_dir: Path
    work_dir: Path
    #: The hub's public key (PEM), pinned here: only messages it signed are obeyed.
    hub_public_key: Path
    concurrency: int = Field(2, ge=1, le=64)
    broker: SpokeBroker = Field(default_factory=SpokeBroker)
    policy: ReleasePolicy = Field(default_factory=ReleasePolicy)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    trust: TrustSettings = Field(default_factory=TrustSettings)
    liveness: LivenessSettings = Field(default_factory=LivenessSettings)

    _id = field_validator("spoke_id")(validate_spoke_id)

    @classmethod
    def load(cls, path: Path) -> SpokeConfig:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
        base = path.parent
        for key in ("data_dir", "work_dir", "hub_public_key"):
            if key in raw and not Path(raw[key]).is_absolute():
                raw[key] = str((base / raw[key]).resolve())
        if "trust" in raw:
            raw["trust"]["publisher_keys"] = [str((base / p).resolve()) for p in
                                              raw["trust"].get("publisher_keys", [])]
        return cls.model_validate(raw)
