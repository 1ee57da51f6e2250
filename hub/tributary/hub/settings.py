"""Hub configuration from ``TRIBUTARY_HUB_*`` environment variables (pydantic-settings)."""

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from tributary.protocol.broker import BrokerSettings


class HubSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRIBUTARY_HUB_", env_file=None)

    database_url: str = "sqlite:///./tributary-hub.db"
    broker_host: str = "127.0.0.1"
    broker_port: int = 61613
    broker_user: str | None = None
    broker_password: SecretStr | None = None
    #: Mutual TLS to a broker configured by `tributary broker config` (identity "hub").
    broker_ca_file: Path | None = None
    broker_cert_file: Path | None = None
    broker_key_file: Path | None = None
    #: Queue namespace shared with this federation's spokes.
    broker_federation: str = "tributary"
    #: Consume the results queue in this process (turn off for an API-only replica).
    consume_results: bool = True
    #: Run the federated-training round loop in this process (turn off when `tributary hub
    #: train` runs apart). It runs only if the hub has object-store credentials.
    run_training: bool = True
    #: The hub's object-store credentials file (``tributary services`` writes one per
    #: party beside the federation's CA): where global models and masked updates live, and
    #: where models are read from for export. Unset: no training service and no model
    #: download (provenance and bundles still work).
    objectstore_credentials: Path | None = None
    #: How often the training loop looks at open rounds (deadlines, stages to close).
    training_poll_seconds: float = Field(0.5, gt=0, le=60)
    #: For this long after the training loop starts, a stage is closed only when every spoke
    #: answered, never at its deadline: answers that waited in the broker while the hub was
    #: down are taken first.
    training_resume_grace_seconds: float = Field(15.0, ge=0, le=3600)
    #: Check at registration that the registry really serves the algorithm's digest.
    verify_registry: bool = True
    #: Creates user ``admin`` with this password on first start, when there is no user yet.
    admin_password: SecretStr | None = None
    #: Sign-in throttling: failed attempts allowed per username and per client address
    #: within the window; further attempts are refused (429) until the window passes.
    signin_window_seconds: float = Field(900.0, gt=0)
    signin_max_failures_per_user: int = Field(5, ge=1)
    signin_max_failures_per_address: int = Field(30, ge=1)
    #: HTTPS: the hub's certificate (PEM, with any intermediates after it) and its private
    #: key; both or neither. Unset, the hub speaks plain HTTP (on loopback, or behind a TLS
    #: proxy).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: Addresses (comma-separated, ``*`` for any) whose X-Forwarded-Proto and X-Forwarded-For
    #: headers are believed: the TLS proxy in front of the hub. Unset: uvicorn's default,
    #: its FORWARDED_ALLOW_IPS variable or else 127.0.0.1.
    forwarded_allow_ips: str | None = None
    #: Strict-Transport-Security max-age sent on every HTTPS response (0: no header).
    hsts_seconds: int = Field(31_536_000, ge=0)
    #: Mark the dashboard's cookies Secure even when a request arrives over plain HTTP (they
    #: always are over HTTPS, including behind a TLS proxy in ``forwarded_allow_ips``).
    cookie_secure: bool = False
    #: The review rule: approvals from this many reviewers of this many organisations.
    review_min_reviewers: int = 2
    review_min_organisations: int = 2
    #: Refuse algorithm versions registered without a publisher release signature.
    require_release_signature: bool = False
    #: Store approval statements beside the image in its registry (cosign's attestation
    #: layout), so anyone can check them with `cosign verify-attestation`. Needs push
    #: access to the registry; failures are audited, not fatal.
    publish_attestations: bool = True
    #: Registries reached over plain HTTP (loopback ones always are).
    insecure_registries: list[str] = []
    #: The registry's token service (distribution's token auth, served at
    #: /api/registry/token): the P-256 key and certificate (PEM, optionally followed by its
    #: chain) that sign registry tokens. The registry and its gateway trust this certificate
    #: or the CA that issued it. Unset: no token service (an open loopback registry).
    registry_token_key: Path | None = None
    registry_token_cert: Path | None = None
    #: Must match the registry's `auth.token.issuer` and `auth.token.service`.
    registry_token_issuer: str = "tributary-hub"
    registry_token_service: str = "tributary-registry"
    registry_token_lifetime_seconds: int = Field(300, ge=30, le=3600)
    #: The CA the registry's TLS certificate is checked against when the hub reads and
    #: writes the registry itself (the federation CA); unset: plain HTTP on loopback.
    registry_ca_file: Path | None = None
    #: The hub's Ed25519 signing key (PKCS#8 PEM), created on first start.
    signing_key: Path = Path("tributary-hub.key")
    #: Before a launch sends anything, check each target spoke's reported publisher trust:
    #: ``strict`` refuses the launch if a spoke's trust excludes the version's publisher or
    #: was never reported; ``reported`` refuses only on a report that excludes it (spokes
    #: older than protocol 1.2 report nothing); ``off`` leaves the decision to the spokes.
    #: Revoked spokes and the sandbox boundary are checked whatever this says.
    launch_trust_check: Literal["strict", "reported", "off"] = "strict"
    #: Federation authorities whose membership credentials this hub trusts: their did:web
    #: DID documents (``did.json`` files; read at every check, never fetched). With at least
    #: one, every spoke needs a valid credential to be enrolled and targeted; none: no
    #: credential is asked for (docs/cohorts.md#participant-credentials).
    federation_authorities: list[Path] = []
    #: The authorities' signed status lists (``status-list.jwt`` files, kept current by the
    #: operator), read at every check: a revocation counts from the next check.
    credential_status_lists: list[Path] = []
    #: Clock skew tolerated on a credential's validity window.
    credential_leeway_seconds: int = Field(60, ge=0, le=300)
    #: How often every stored credential is checked again (expiry, revocation).
    credential_check_seconds: float = Field(300.0, gt=0)
    #: Data access requests (docs/cohorts.md): when true, every launch (experiment or
    #: training study) must be bound to an approved, unexpired request and stay inside its
    #: conditions. Off by default; on in the demo.
    require_access_requests: bool = False
    #: How many committee members must approve the same conditions before a request is
    #: approved (one refusal refuses). One: the committee decides in session and one member
    #: records its decision; raise it where each member signs off on their own.
    access_committee_quorum: int = Field(1, ge=1, le=20)
    #: Largest ethics approval or DPIA file accepted, in bytes.
    access_attachment_max_bytes: int = Field(10 * 1024 * 1024, ge=1024, le=100 * 1024 * 1024)
    #: Days an experiment message waits in the broker for an offline spoke.
    default_expiry_days: float = 7.0
    #: A spoke is shown online when the hub heard from it this recently (or within three
    #: of the heartbeat intervals it announces, when that is longer).
    spoke_online_seconds: float = 90.0
    #: The forensic audit log (hash-chained JSON lines); by default next to a SQLite
    #: database as ``<name>-audit.jsonl``, else ``tributary-hub-audit.jsonl`` here.
    audit_log: Path | None = None
    #: Small-cell suppression: aggregate figures over fewer cases than this are withheld.
    min_cell_size: int = Field(5, ge=1)
    #: Celery broker for aggregation tasks (e.g. ``redis://127.0.0.1:6390/0``); unset runs
    #: them in the hub process (Celery eager mode), with no extra service.
    celery_broker_url: str | None = None
    #: Celery queue of this hub's aggregation tasks; default ``<broker_federation>.aggregation``.
    celery_queue: str | None = None
    #: A stale study's aggregate snapshot is recomputed at most once per this many seconds
    #: (results only mark it stale; see services/debounce.py). Completion recomputes at once.
    aggregate_interval_seconds: float = Field(2.0, gt=0)
    #: While results arrive, the figures that need every value (AUC, ROC curves, quantiles,
    #: bootstrap intervals) are recomputed at most once per this many seconds; counts,
    #: proportions and means follow running sums at every recomputation.
    aggregate_full_interval_seconds: float = Field(30.0, gt=0)
    #: The results consumer stores up to this many messages in one transaction (what
    #: arrived within ``results_batch_wait_ms`` of the first), acknowledging each one only
    #: after the commit.
    results_batch_size: int = Field(100, ge=1, le=1000)
    results_batch_wait_ms: float = Field(20.0, ge=0, le=1000)
    #: The broker's prefetch for the results consumer, in batches: at most this many
    #: batches of messages unacknowledged in flight to it. One batch makes the broker wait
    #: for a batch's acknowledgements before sending more (the consumer then idles while a
    #: batch is stored); more keeps the next batch arriving while one is being stored.
    results_prefetch_batches: int = Field(4, ge=1, le=50)
    #: Worker processes that open the results consumer's next batch (parse, validate, check
    #: the envelope's and the custody record's signatures) while it stores the current
    #: one: most of a result's CPU is in those checks. 0 opens batches in the consuming
    #: thread. The default, one process, leaves the consumer a core for the database.
    results_verify_processes: int = Field(1, ge=0, le=64)
    #: A result whose custody record comes after records not yet received is held this
    #: long (unacknowledged, tried again with each batch) before it is refused as a custody
    #: gap: with competing consumers, a spoke that does not send its results as one message
    #: group can have record n+1 handled before record n.
    custody_gap_hold_seconds: float = Field(5.0, ge=0, le=300)

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            given, missing = (("certificate", "key") if self.tls_key_file is None
                              else ("key", "certificate"))
            raise ValueError(f"a TLS {given} is given but no {missing} (TRIBUTARY_HUB_TLS_"
                             "CERT_FILE and TRIBUTARY_HUB_TLS_KEY_FILE, or --tls-cert and "
                             "--tls-key): HTTPS needs both")
        return self

    @model_validator(mode="after")
    def _status_lists_with_authorities(self) -> Self:
        if self.federation_authorities and not self.credential_status_lists:
            raise ValueError("federation authorities are trusted but no status list is "
                             "configured (TRIBUTARY_HUB_CREDENTIAL_STATUS_LISTS): every "
                             "credential would be refused, as its revocation cannot be "
                             "checked")
        return self

    @property
    def tls(self) -> bool:
        """Whether the hub serves HTTPS itself."""
        return self.tls_cert_file is not None

    def broker(self) -> BrokerSettings:
        return BrokerSettings(host=self.broker_host, port=self.broker_port,
                              user=self.broker_user, password=self.broker_password,
                              ca_file=self.broker_ca_file, cert_file=self.broker_cert_file,
                              key_file=self.broker_key_file,
                              federation=self.broker_federation)

    def aggregation_queue(self) -> str:
        return self.celery_queue or f"{self.broker_federation}.aggregation"

    def audit_log_path(self) -> Path | None:
        return self.audit_log or default_audit_log(self.database_url)

    @classmethod
    def with_database(cls, database_url: str | None) -> "HubSettings":
        """Settings from the environment, with the database a command's ``--database-url``
        names instead, when it names one."""
        return cls(database_url=database_url) if database_url else cls()

    @classmethod
    def for_directory(cls, directory: Path, **overrides: object) -> "HubSettings":
        return cls(**{"database_url": f"sqlite:///{directory / 'hub.db'}", **overrides})


def default_audit_log(database_url: str) -> Path | None:
    """Where the forensic log goes when not configured: beside a SQLite file (so the two
    are backed up and moved together); None for an in-memory database."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return Path("tributary-hub-audit.jsonl")
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    path = Path(database)
    return path.with_name(f"{path.stem}-audit.jsonl")
