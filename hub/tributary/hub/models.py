"""Database tables (SQLModel). JSON columns hold the pydantic payloads verbatim."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Index, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class Role(StrEnum):
    ADMIN = "admin"  # spokes, keys, publishers, users; everything
    COORDINATOR = "coordinator"  # experiments: create, launch, read results
    DEVELOPER = "developer"  # algorithm versions
    REVIEWER = "reviewer"  # reviews of algorithm versions
    COMMITTEE = "committee"  # the data access committee: decides data access requests


class Organisation(SQLModel, table=True):
    """An organisation reviewers and other users belong to. The review rule counts these
    records by id, so spellings of one name ("North", "north ") are one organisation."""

    id: int | None = Field(default=None, primary_key=True)
    name: str
    #: The normalised name (:func:`tributary.hub.services.organisations.name_key`); unique.
    name_key: str = Field(unique=True)
    created_at: datetime = Field(default_factory=utcnow)


class User(SQLModel, table=True):
    username: str = Field(primary_key=True)
    organisation_id: int | None = Field(default=None, foreign_key="organisation.id",
                                        index=True)
    roles: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    password_hash: str
    created_at: datetime = Field(default_factory=utcnow)
    disabled: bool = False


class ApiToken(SQLModel, table=True):
    """A bearer token; only its SHA-256 is stored."""

    token_sha256: str = Field(primary_key=True)
    username: str = Field(foreign_key="user.username", index=True)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime


class Spoke(SQLModel, table=True):
    id: str = Field(primary_key=True, description="Spoke identifier; also names its queue.")
    name: str
    institution: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    #: Liveness, from the spoke's last message of any kind (heartbeats above all).
    last_seen_at: datetime | None = None
    #: What the spoke's latest heartbeat said about itself.
    last_heartbeat_at: datetime | None = None
    heartbeat_interval_s: float | None = None
    spoke_version: str | None = None
    concurrency: int | None = None
    queue_depth: int | None = None
    outbox_depth: int | None = None
    running: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    #: The highest head of the spoke's audit log its heartbeats reported: the anchor a cut
    #: or recreated log is checked against (``tributary audit verify --anchors``).
    audit_head_seq: int | None = None
    audit_head_hash: str | None = None
    audit_head_at: datetime | None = None
    #: The last reported head that went backwards ("seq:hash"), recorded once as an event.
    audit_head_refused: str | None = None
    #: Set by an administrator: the spoke loses broker, registry and object-store access
    #: together (``tributary pki revoke``); the hub refuses its results and registry tokens.
    revoked_at: datetime | None = None
    #: The federation certificate the spoke's heartbeats say it holds: expiry is watched.
    certificate_not_after: datetime | None = None
    certificate_serial: str | None = None
    #: Enrolled as a sandbox: synthetic data only; runs unreviewed versions for their own
    #: developer (sandbox studies), and only sandbox studies target it.
    sandbox: bool = False
    #: The publisher trust its latest heartbeat reported (None: never reported, e.g. a
    #: spoke older than protocol 1.2): whether it requires a publisher and which key ids.
    trust_reported_at: datetime | None = None
    trust_required: bool | None = None
    trusted_publishers: list[str] | None = Field(default=None, sa_column=Column(JSON))
    trust_sandbox: bool | None = None
    #: What one case may have there (GPUs, /tmp, time, memory, CPUs, executor), as its
    #: latest heartbeat reported (protocol 1.5; None: never reported).
    capacity: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class SpokeKey(SQLModel, table=True):
    """A spoke's enrolled public key. Only active keys are trusted; rotation is enrolling a
    new key and revoking the old one."""

    keyid: str = Field(primary_key=True)
    spoke_id: str = Field(foreign_key="spoke.id", index=True)
    public_key_pem: str
    enrolled_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class SpokeCredential(SQLModel, table=True):
    """The membership credential a spoke presented (a VC-JWT signed by a federation
    authority, ``tributary.protocol.cohorts.credentials``) and the outcome of its latest
    check: at presentation, periodically, and at every launch that targets the spoke."""

    spoke_id: str = Field(foreign_key="spoke.id", primary_key=True)
    token: str
    credential_id: str
    issuer: str
    subject: str
    keyids: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    valid_from: datetime
    valid_until: datetime
    status_list: str
    status_index: int
    presented_at: datetime = Field(default_factory=utcnow)
    presented_by: str
    checked_at: datetime = Field(default_factory=utcnow)
    #: ``valid`` or ``refused`` (with the reason) at ``checked_at``.
    state: str = "valid"
    reason: str = ""


class Publisher(SQLModel, table=True):
    """An algorithm publisher whose release signatures the hub checks at registration."""

    keyid: str = Field(primary_key=True)
    name: str = Field(index=True)
    public_key_pem: str
    created_at: datetime = Field(default_factory=utcnow)


class SpokeChain(SQLModel, table=True):
    """Head of each spoke's custody hash chain as accepted by the hub."""

    spoke_id: str = Field(foreign_key="spoke.id", primary_key=True)
    sequence: int
    record_sha256: str


class QuarantinedMessage(SQLModel, table=True):
    """A message the hub refused, kept with its reason for investigation."""

    id: int | None = Field(default=None, primary_key=True)
    received_at: datetime = Field(default_factory=utcnow, index=True)
    broker_message_id: str = ""
    claimed_spoke: str | None = None
    reason: str
    body: str


class Algorithm(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    version: str
    repository: str
    digest: str
    description: str = ""
    argument_schema: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    aggregator: str = "summary"
    release_signature: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    publisher: str | None = None
    registered_by: str = ""
    approval: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    approved_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_reason: str | None = None


class Review(SQLModel, table=True):
    """One reviewer's decision on one algorithm version."""

    __table_args__ = (UniqueConstraint("algorithm_id", "reviewer"),)

    id: int | None = Field(default=None, primary_key=True)
    algorithm_id: int = Field(foreign_key="algorithm.id", index=True)
    reviewer: str
    organisation: str  # the organisation's name when the review was made, for display
    organisation_id: int | None = Field(default=None, foreign_key="organisation.id")
    decision: str  # approve | reject
    comment: str = ""
    at: datetime = Field(default_factory=utcnow)
    created_at: datetime = Field(default_factory=utcnow)


class ExperimentState(StrEnum):
    DRAFT = "draft"
    LAUNCHED = "launched"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class Experiment(SQLModel, table=True):
    id: str = Field(primary_key=True)
    name: str
    algorithm_id: int = Field(foreign_key="algorithm.id")
    arguments: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    cohort: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    limits: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    release: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    aggregator: str = "summary"
    aggregator_parameters: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    state: ExperimentState = ExperimentState.DRAFT
    created_at: datetime = Field(default_factory=utcnow)
    launched_at: datetime | None = None
    completed_at: datetime | None = None
    expires_at: datetime | None = None
    cancelled_at: datetime | None = None
    cancel_reason: str | None = None
    #: Set (if unset) by every accepted result, cleared when a recomputation starts: the
    #: stored aggregate snapshot may lag behind the results (services/debounce.py).
    aggregate_stale_since: datetime | None = None
    #: When a hub process last claimed the recomputation of this aggregate; one claim per
    #: interval, so several hub processes never recompute the same study at once.
    aggregate_claimed_at: datetime | None = None
    #: Ingest keeps running sums of this study's results (:class:`AggregatePartial`), so a
    #: snapshot's counts and moments cost the same at any size. False for studies created
    #: before the sums existed: theirs are always recomputed from every result.
    aggregate_incremental: bool = True
    #: A sandbox study: an unreviewed version on sandbox spokes only, launched by the
    #: version's own registrant (``owner``), whose results go back to that developer.
    sandbox: bool = False
    owner: str | None = None
    #: The approved data access request it runs under (services/access_grants.py).
    access_request_id: str | None = Field(default=None, foreign_key="accessrequest.id",
                                          index=True)


class TargetState(StrEnum):
    PENDING = "pending"  # not yet published
    PUBLISHED = "published"  # waiting in the spoke's queue
    HELD = "held"  # waiting for the site's data steward (reason says what waits)
    ACCEPTED = "accepted"  # the spoke selected its cases and is working
    REFUSED = "refused"  # the spoke will not run it (reason says why)
    COMPLETED = "completed"  # every selected case has a result
    CANCELLING = "cancelling"  # a cancellation was sent; the spoke has not confirmed it
    CANCELLED = "cancelled"  # the spoke confirmed the cancellation (or it was never sent)


TERMINAL_TARGET_STATES = {TargetState.REFUSED, TargetState.COMPLETED, TargetState.CANCELLED}


class ExperimentTarget(SQLModel, table=True):
    experiment_id: str = Field(foreign_key="experiment.id", primary_key=True)
    spoke_id: str = Field(foreign_key="spoke.id", primary_key=True)
    state: TargetState = TargetState.PENDING
    case_count: int | None = None
    reason: str | None = None
    message_id: str | None = None
    published_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)
    #: When the spoke said every case was done; the target completes only once every
    #: case also has its result here (a lost result keeps it open).
    spoke_completed_at: datetime | None = None
    #: When the hub withdrew the spoke from the study (its membership lapsed): nothing it
    #: sends for the study counts from then on (services/lapse.py).
    withdrawn_at: datetime | None = None


class CaseState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # never ran, or was stopped, because the study was cancelled


FINAL_CASE_STATES = {CaseState.SUCCEEDED, CaseState.FAILED, CaseState.CANCELLED}


class CaseResult(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("experiment_id", "spoke_id", "case_id"),
                      # counts by state, per study and per spoke, without reading rows
                      Index("ix_caseresult_experiment_spoke_state",
                            "experiment_id", "spoke_id", "state"),
                      # cases of one state in (spoke, case) order, for the filtered case
                      # list; covers the aggregate's freshness digest (read from the index)
                      Index("ix_caseresult_experiment_state_case", "experiment_id", "state",
                            "spoke_id", "case_id", "attempt", "received_at",
                            "result_message_id"))

    id: int | None = Field(default=None, primary_key=True)
    experiment_id: str = Field(foreign_key="experiment.id", index=True)
    spoke_id: str = Field(foreign_key="spoke.id")
    case_id: str
    state: CaseState = CaseState.QUEUED
    attempt: int = 1
    output: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    failure: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    released: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    image_digest: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result_message_id: str | None = None
    received_at: datetime | None = None
    custody: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    custody_sha256: str | None = Field(default=None, index=True)
    #: The latest progress the algorithm reported for the current attempt.
    progress_fraction: float | None = None
    progress_message: str | None = None
    progress_at: datetime | None = None
    #: Why the case has no result (cancellation, a retry the spoke refused...).
    note: str | None = None


class CaseAttempt(SQLModel, table=True):
    """Every accepted result, one row per (experiment, spoke, case, attempt): the history
    behind a case's latest result (:class:`CaseResult`), and the idempotency key that keeps
    a second result for the same attempt from counting."""

    __table_args__ = (UniqueConstraint("experiment_id", "spoke_id", "case_id", "attempt"),)

    id: int | None = Field(default=None, primary_key=True)
    experiment_id: str = Field(foreign_key="experiment.id", index=True)
    spoke_id: str = Field(foreign_key="spoke.id")
    case_id: str
    attempt: int
    state: CaseState
    failure: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    result_message_id: str
    custody_sha256: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    received_at: datetime = Field(default_factory=utcnow)


class GapState(StrEnum):
    OPEN = "open"  # records missing; the hub asks the spoke to resend them
    RESOLVED = "resolved"  # the spoke resent them and the chain continues
    ACCEPTED = "accepted"  # an administrator accepted that they are lost (audited)


class CustodyGap(SQLModel, table=True):
    """Records of a spoke's custody chain that never reached the hub (a result message lost
    on the broker). ``last_missing`` is None while the hub only knows that results are
    missing after ``first_missing - 1`` (the spoke said it was done, no later record came)."""

    id: int | None = Field(default=None, primary_key=True)
    spoke_id: str = Field(foreign_key="spoke.id", index=True)
    first_missing: int
    last_missing: int | None = None
    state: str = GapState.OPEN.value
    detected_at: datetime = Field(default_factory=utcnow)
    resend_requested_at: datetime | None = None
    resend_requests: int = 0
    settled_at: datetime | None = None
    accepted_by: str | None = None
    accepted_reason: str | None = None
    #: Cases settled as lost when the gap was accepted: {experiment_id: [case_id, ...]}.
    lost_cases: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class InboundMessage(SQLModel, table=True):
    """Every message id the hub has processed, so redeliveries are recognised."""

    message_id: str = Field(primary_key=True)
    kind: str
    spoke_id: str
    received_at: datetime = Field(default_factory=utcnow)


class AuditEvent(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    actor: str
    action: str = Field(index=True)
    target: str = ""
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    #: The event's entry in the hub's forensic log: every row anchors that log's head.
    log_seq: int | None = None
    log_hash: str | None = None
    #: Which log (its path): processes elsewhere (a Celery worker, the CLI) may keep their own.
    log_name: str | None = None


class CountQuery(SQLModel, table=True):
    """A federated count: how many cases match ``selection`` at each target spoke."""

    id: str = Field(primary_key=True)
    selection: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_by: str
    created_at: datetime = Field(default_factory=utcnow, index=True)
    expires_at: datetime | None = None


class CountAnswerState(StrEnum):
    PENDING = "pending"  # not yet published
    PUBLISHED = "published"  # waiting in the spoke's queue
    ANSWERED = "answered"  # count or fewer_than holds the answer
    REFUSED = "refused"  # the spoke would not answer (reason says why)


class CountAnswer(SQLModel, table=True):
    """One spoke's answer to a count query. Only the number reaches the hub; a small cell
    arrives as ``fewer_than`` k (the spoke's own threshold), never as its value."""

    query_id: str = Field(foreign_key="countquery.id", primary_key=True)
    spoke_id: str = Field(foreign_key="spoke.id", primary_key=True)
    state: CountAnswerState = CountAnswerState.PENDING
    count: int | None = None
    fewer_than: int | None = None
    reason: str | None = None
    request_message_id: str | None = None
    reply_message_id: str | None = None
    answered_at: datetime | None = None


class AggregateSnapshot(SQLModel, table=True):
    """One computed aggregate of an experiment, already suppressed. A new version is stored
    whenever the aggregated inputs change, so pages read the latest without recomputing."""

    __table_args__ = (UniqueConstraint("experiment_id", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    experiment_id: str = Field(foreign_key="experiment.id", index=True)
    version: int
    computed_at: datetime = Field(default_factory=utcnow)
    #: Digest of what was aggregated (results, aggregator, parameters, k).
    inputs_sha256: str
    results: int
    min_cell_size: int
    report: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class AggregatePartial(SQLModel, table=True):
    """Exact running sums over one spoke's succeeded cases of one study (counts, and sums
    of values and squares as integers in units of 2**-1074), updated in the transaction
    that stores each result (services/partials.py): a redelivered result changes nothing,
    a replaced one is subtracted. The aggregator turns them into figures."""

    experiment_id: str = Field(foreign_key="experiment.id", primary_key=True)
    spoke_id: str = Field(primary_key=True)
    sums: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class AggregateFull(SQLModel, table=True):
    """The figures of the last full pass over a study that need every value (AUC, ROC
    curves, quantiles), per group and NOT suppressed: never shown as such, only merged
    with the running sums into suppressed snapshots between full passes."""

    experiment_id: str = Field(foreign_key="experiment.id", primary_key=True)
    computed_at: datetime = Field(default_factory=utcnow)
    #: The inputs digest (services/aggregation.inputs_digest) the pass read.
    inputs_sha256: str
    results: int
    aggregator: str
    parameters: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    groups: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class SignInFailure(SQLModel, table=True):
    """One failed sign-in, counted against a user name (``kind`` "user", case-folded) and
    against the caller's address ("address"). In the database, so every web process of a
    hub counts the same failures (sign-in throttling, services/throttle.py)."""

    __table_args__ = (Index("ix_signinfailure_kind_key_at", "kind", "key", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str
    key: str
    #: Seconds since the epoch (wall clock: shared by processes, unlike a monotonic one).
    at: float = Field(index=True)


class TrainingStudy(SQLModel, table=True):
    """A federated training study: the settings a coordinator launched it with, the
    current global model and the study's privacy ledger (one per spoke, JSON)."""

    id: str = Field(primary_key=True)
    name: str
    #: The training image, pinned (``repository@sha256:...``): the approved version's.
    algorithm: str
    #: The registered, approved algorithm version whose image and approval the hub sends
    #: with every round (None only for studies launched before versions were required).
    algorithm_id: int | None = Field(default=None, foreign_key="algorithm.id")
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | fedyogi | fedadagrad
    proximal_mu: float = 0.0
    #: The server optimiser's settings (``ServerOptimiser`` JSON) for fedadam, fedyogi and
    #: fedadagrad; None for fedavg and fedprox.
    server_optimiser: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    rounds: int
    min_participants: int
    round_deadline_s: float
    max_attempts: int = 3
    clip_bound: float
    noise_multiplier: float
    epsilon_budget: float
    delta: float
    spokes: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    #: Digest of the current global model in the object store (None until initialised).
    global_model: str | None = None
    #: running | finished | stopped_budget | failed
    state: str = "running"
    stop_reason: str | None = None
    #: Spoke id -> PrivacyLedger JSON.
    ledgers: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_by: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    #: The approved data access request it runs under; its ε budget is spent at launch.
    access_request_id: str | None = Field(default=None, foreign_key="accessrequest.id",
                                          index=True)


class TrainingRound(SQLModel, table=True):
    """One attempt of one round. ``secagg`` holds the hub's SecAgg+ state (no spoke
    secret, no vector: masked vectors are in the object store, named by digest)."""

    __table_args__ = (UniqueConstraint("study_id", "round_index", "attempt"),)

    id: int | None = Field(default=None, primary_key=True)
    study_id: str = Field(foreign_key="trainingstudy.id", index=True)
    round_index: int
    attempt: int = 1
    round_id: str = Field(unique=True)
    #: keys | shares | masked | consistency | unmask | aggregated | retried | failed
    stage: str = "keys"
    stage_deadline: datetime
    participants: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    secagg: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    #: Spoke id -> sample count it announced when joining.
    num_examples: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON))
    #: Spoke id -> object digest of its masked vector.
    uploads: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON))
    #: Spoke id -> the local training loss it announced when joining (if any).
    losses: dict[str, float] | None = Field(default_factory=dict, sa_column=Column(JSON))
    #: Spokes that refused this attempt (spoke -> reason): the stages no longer wait for them.
    refused: dict[str, str] | None = Field(default_factory=dict, sa_column=Column(JSON))
    global_model_in: str | None = None
    global_model_out: str | None = None
    #: Digest of the server optimiser's moments after this round (with a server optimiser).
    optimiser_state_out: str | None = None
    epsilon_cumulative: float | None = None
    mean_loss: float | None = None
    outcome_reason: str | None = None
    opened_at: datetime = Field(default_factory=utcnow)
    closed_at: datetime | None = None


class TrainingCustody(SQLModel, table=True):
    """A spoke's signed custody record of a masked update, as the hub received it: the
    spoke's chain of training records, kept so each new one is checked against the last
    (a gap or a fork is refused)."""

    __table_args__ = (UniqueConstraint("spoke_id", "sequence"),)

    id: int | None = Field(default=None, primary_key=True)
    spoke_id: str = Field(index=True)
    sequence: int
    #: SHA-256 of the envelope (what the spoke's next record names as its previous one).
    record_sha256: str
    study_id: str
    round_id: str
    object_digest: str
    envelope: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    received_at: datetime = Field(default_factory=utcnow)


class SpokeCatalogEntry(SQLModel, table=True):
    """The latest signed description each spoke published of what it holds (the federated
    catalog). ``envelope`` is the spoke-signed DSSE envelope as received, kept for audit:
    anyone holding the spoke's key can check ``description`` against it."""

    spoke_id: str = Field(foreign_key="spoke.id", primary_key=True)
    digest: str
    description: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    envelope: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    message_id: str
    generated_at: datetime
    received_at: datetime = Field(default_factory=utcnow, index=True)
class PsiRun(SQLModel, table=True):
    """A private set intersection between spokes (docs/cohorts.md). The hub relays the
    spokes' messages and keeps only their sizes; the result is a suppressed number."""

    id: str = Field(primary_key=True)
    mode: str  # cardinality | intersection
    purpose: str
    leader: str = Field(foreign_key="spoke.id")
    created_by: str
    created_at: datetime = Field(default_factory=utcnow, index=True)
    expires_at: datetime | None = None
    state: str = "requested"  # requested | running | done | refused | failed
    #: The approved data access request it runs under (services/access_grants.py).
    access_request_id: str | None = Field(default=None, foreign_key="accessrequest.id",
                                          index=True)


class PsiMember(SQLModel, table=True):
    """One spoke of a PSI: its state as it reported it, and the size it reported (a small
    one only as ``fewer_than`` its k)."""

    psi_id: str = Field(foreign_key="psirun.id", primary_key=True)
    spoke_id: str = Field(foreign_key="spoke.id", primary_key=True)
    position: int  # 0: the leader
    state: str = "pending"  # pending | published | held | approved | refused | done | failed
    reason: str | None = None
    count: int | None = None
    fewer_than: int | None = None
    request_message_id: str | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class PsiRelayRecord(SQLModel, table=True):
    """One message a spoke asked the hub to relay. ``payload`` is held only until it is
    forwarded (then emptied); the size, step and parties stay for the audit."""

    id: int | None = Field(default=None, primary_key=True)
    relay_message_id: str = Field(unique=True)
    psi_id: str = Field(foreign_key="psirun.id", index=True)
    from_spoke: str
    to_spoke: str
    step: str
    size: int
    payload: str | None = None
    received_at: datetime = Field(default_factory=utcnow)
    forwarded_at: datetime | None = Field(default=None, index=True)
    forward_message_id: str | None = None
class AccessRequestState(StrEnum):
    SUBMITTED = "submitted"  # waiting for the data access committee
    APPROVED = "approved"  # approved with conditions (``conditions``)
    REFUSED = "refused"  # refused with a reason
    WITHDRAWN = "withdrawn"  # withdrawn by its requester


class AccessRequest(SQLModel, table=True):
    """A coordinator's data access request to the data access committee: what for, which
    spokes, attributes and kinds of study, with the ethics approval and the DPIA attached
    (:class:`AccessAttachment`). Launches bound to it stay inside ``conditions``."""

    id: str = Field(primary_key=True)
    title: str
    purpose: str
    requested_by: str = Field(index=True)
    spokes: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    attributes: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    study_kinds: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    epsilon: float | None = None
    k: int | None = None
    state: str = Field(default=AccessRequestState.SUBMITTED.value, index=True)
    #: ``AccessConditions`` JSON once approved.
    conditions: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    decided_at: datetime | None = None
    refusal_reason: str | None = None
    withdrawn_at: datetime | None = None
    #: ε already budgeted by training studies bound to it; raised only by one conditional
    #: UPDATE (services/access_grants.spend), so two launches never share the last of it.
    epsilon_spent: float = 0.0
    created_at: datetime = Field(default_factory=utcnow)


class AccessVote(SQLModel, table=True):
    """One committee member's decision on one request; the request is decided when
    ``access_committee_quorum`` members approved the same conditions (by digest), or one
    refused."""

    __table_args__ = (UniqueConstraint("request_id", "member"),)

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(foreign_key="accessrequest.id", index=True)
    member: str
    decision: str  # approve | refuse
    conditions: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    conditions_sha256: str | None = None
    reason: str = ""
    at: datetime = Field(default_factory=utcnow)


class AccessAttachment(SQLModel, table=True):
    """A file attached to a request (the ethics approval, the DPIA), kept by its SHA-256
    digest after its type was checked from its content; served back only to the requester,
    the committee and administrators."""

    __table_args__ = (UniqueConstraint("request_id", "kind"),)

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(foreign_key="accessrequest.id", index=True)
    kind: str  # ethics | dpia
    digest: str
    filename: str
    media_type: str
    size: int
    content: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
class VerticalStudy(SQLModel, table=True):
    """A vertical training study: two spokes with different columns of one PSI's linked
    cohort train one logistic regression; the hub coordinates the rounds and relays what
    the spokes exchange (ciphertexts and masked values, never a feature or a pseudonym).
    The current stage's answers are kept here until the stage closes, so a hub that
    restarts resends exactly what is still unanswered."""

    id: str = Field(primary_key=True)
    name: str
    psi_id: str
    features_spoke: str
    label_spoke: str
    features_attributes: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    label_attributes: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    label: str
    #: The label value counted as positive (JSON: a string, number or boolean).
    positive: Any = Field(default=None, sa_column=Column(JSON))
    #: ``Hyperparameters`` JSON (rounds, learning rate, l2, key bits).
    hyperparameters: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    release_coefficients: bool = False
    #: inviting | running | completed | refused | failed
    state: str = "inviting"
    reason: str | None = None
    round_index: int = 0
    #: invite | share | cross | decrypt | apply | finish
    stage: str = "invite"
    #: Spoke id -> {"state", "reason", "public_key", "rows", "features"} from its status.
    parties: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    #: Spoke id -> its ``Reply`` JSON for the current round and stage.
    answers: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    #: The training loss before each round's step, as the label spoke computed it.
    losses: list[float] = Field(default_factory=list, sa_column=Column(JSON))
    #: Spoke id -> its ``Final`` JSON (coefficients only if the study released them).
    final: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    #: The approved data access request it runs under (services/access_grants.py).
    access_request_id: str | None = Field(default=None, foreign_key="accessrequest.id",
                                          index=True)
    created_by: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
