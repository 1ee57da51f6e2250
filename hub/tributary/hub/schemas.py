"""Request and response bodies of the REST API, beside the tables (``models``) they are
read from: services build them too, so they belong to no route module."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from tributary.hub.services.server_optimisers import HYPER_PARAMETERS, settings_for
from tributary.protocol.messages import (
    DIGEST_RE,
    REPOSITORY_RE,
    SPOKE_ID_RE,
    CohortSelection,
    RunLimits,
    validate_digest,
    validate_repository,
    validate_spoke_id,
)


class SpokeCreate(BaseModel):
    id: str = Field(description="Identifier, also the name of the spoke's queue.",
                    json_schema_extra={"pattern": SPOKE_ID_RE.pattern})
    name: str
    institution: str = ""
    sandbox: bool = Field(False, description=(
        "A sandbox spoke: synthetic data only, runs developers' unreviewed versions in "
        "sandbox studies and nothing else."))

    _id = field_validator("id")(validate_spoke_id)


class SandboxRunCreate(BaseModel):
    """A developer's try-out of their own version on the sandbox spokes."""

    name: str = Field("", max_length=200)
    arguments: dict[str, Any] = Field(default_factory=dict)
    cohort: CohortSelection = Field(default_factory=CohortSelection)
    limits: RunLimits = Field(default_factory=RunLimits)
    #: Sandbox spokes to run on; default: every sandbox spoke.
    spoke_ids: list[str] = Field(default_factory=list)


class SpokeTrustRead(BaseModel):
    """Whether one spoke will run one version, and why not."""

    spoke_id: str
    name: str
    runs: bool
    reason: str
    sandbox: bool


class ReviewCreate(BaseModel):
    decision: Literal["approve", "reject"]
    comment: str = Field("", max_length=2000)


class RevokeBody(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)


class PublisherCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    public_key_pem: str


class KeyEnrol(BaseModel):
    public_key_pem: str = Field(description="Ed25519 public key, PEM (SubjectPublicKeyInfo).")
    credential: str | None = Field(
        None, max_length=16 * 1024,
        description="The spoke's membership credential (VC-JWT from a federation authority) "
                    "naming this key; required when the hub trusts a federation authority, "
                    "unless the spoke already presented one that names it.")


class CredentialPresent(BaseModel):
    credential: str = Field(max_length=16 * 1024,
                            description="Membership credential (VC-JWT, compact JWS).")


class SpokeCredentialRead(BaseModel):
    """A spoke's stored membership credential and its latest check (``required``: whether
    the hub asks for one at all)."""

    spoke_id: str
    required: bool
    present: bool
    state: str = ""
    reason: str = ""
    credential_id: str = ""
    issuer: str = ""
    subject: str = ""
    keyids: list[str] = []
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    status_list: str = ""
    status_index: int | None = None
    presented_at: datetime | None = None
    presented_by: str = ""
    checked_at: datetime | None = None


class GapAccept(BaseModel):
    reason: str = Field(min_length=1, max_length=2000,
                        description="Why the missing custody records are accepted as lost.")


class AlgorithmCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    version: str = Field(min_length=1, max_length=50)
    repository: str = Field(description="registry/repository, without tag",
                            json_schema_extra={"pattern": REPOSITORY_RE.pattern})
    digest: str = Field(description="manifest digest sha256:…; a tag is never accepted",
                        json_schema_extra={"pattern": DIGEST_RE.pattern})
    description: str = ""
    argument_schema: dict[str, Any] = Field(default_factory=dict)
    aggregator: str = "summary"
    release_signature: dict[str, Any] | None = Field(
        None, description="DSSE envelope of the publisher's release statement for the digest.")

    _repository = field_validator("repository")(validate_repository)
    _digest = field_validator("digest")(validate_digest)


class ExperimentCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    algorithm_id: int = Field(ge=1, le=2**63 - 1)
    arguments: dict[str, Any] = Field(default_factory=dict)
    cohort: CohortSelection = Field(default_factory=CohortSelection)
    limits: RunLimits = Field(default_factory=RunLimits)
    release: list[str] = Field(default_factory=list)
    spoke_ids: list[str] = Field(min_length=1)
    aggregator: str | None = None
    aggregator_parameters: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of the aggregator, e.g. "
        "{'score': 'probability', 'label': 'diagnosis'} for binary-classification.")
    expires_in_days: float | None = Field(
        None, gt=0, le=365,
        description="How long the study's messages wait in the broker for an offline spoke "
        "before they expire (into the dead-letter queue); default: the hub's "
        "TRIBUTARY_HUB_DEFAULT_EXPIRY_DAYS.")
    access_request_id: str | None = Field(None, max_length=64, description=(
        "The approved data access request the experiment runs under (required when the "
        "hub requires access requests); checked again at launch."))


class TargetProgress(BaseModel):
    spoke_id: str
    state: str
    reason: str | None
    case_count: int | None
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int = 0
    spoke_online: bool = False
    spoke_last_seen_at: datetime | None = None
    waiting_for: str | None = Field(
        None, description="What this target waits for, in words (None once it is done).")
    withdrawn_at: datetime | None = Field(
        None, description="When the hub withdrew the spoke (its membership lapsed); reason "
                          "says why. Nothing it sent afterwards counts.")


class SpokeRead(BaseModel):
    """A spoke with its liveness as the hub sees it."""

    id: str
    name: str
    institution: str
    created_at: datetime
    online: bool
    last_seen_at: datetime | None
    last_heartbeat_at: datetime | None
    spoke_version: str | None
    concurrency: int | None
    queue_depth: int | None
    outbox_depth: int | None
    running: list[dict[str, Any]]
    #: When an administrator revoked the spoke (broker, registry, object store, results).
    revoked_at: datetime | None = None
    #: The federation certificate the spoke's heartbeats report, and whole days it has left
    #: (negative once expired); None until a heartbeat reported one.
    certificate_serial: str | None = None
    certificate_not_after: datetime | None = None
    certificate_days_left: int | None = None
    #: "ok", "renew" (within the renewal window), "expired", or None when unknown.
    certificate_state: str | None = None
    #: Enrolled as a sandbox (synthetic data only).
    sandbox: bool = False
    #: The publisher trust its heartbeats report (None: never reported).
    trust_reported_at: datetime | None = None
    trust_required: bool | None = None
    trusted_publishers: list[str] | None = None
    #: What one case may have there (GPUs, /tmp, limits, executor), as reported.
    capacity: dict[str, Any] | None = None


class SpokeRevoke(BaseModel):
    reason: str = Field(..., min_length=1, max_length=2000)


class AttemptRead(BaseModel):
    attempt: int
    state: str
    failure: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None
    received_at: datetime


class CancelBody(BaseModel):
    reason: str = Field("cancelled by the coordinator", min_length=1, max_length=2000)


class RetryBody(BaseModel):
    case_ids: list[str] | None = Field(
        None, description="Failed cases to run again; all failed cases when omitted.")
    spoke_ids: list[str] | None = Field(None, description="Only cases of these spokes.")
    reason: str | None = Field(None, max_length=2000)


class RetryRead(BaseModel):
    experiment_id: str
    requested: dict[str, list[str]] = Field(description="Spoke id → cases asked to run again.")


class CaseRead(BaseModel):
    spoke_id: str
    case_id: str
    state: str
    attempt: int
    output: dict[str, Any] | None
    failure: dict[str, Any] | None
    released: dict[str, Any]
    image_digest: str | None
    started_at: datetime | None
    finished_at: datetime | None
    progress_fraction: float | None = None
    progress_message: str | None = None
    progress_at: datetime | None = None
    note: str | None = None
    attempts: list[AttemptRead] = Field(default_factory=list)


class ExperimentRead(BaseModel):
    id: str
    name: str
    state: str
    algorithm_id: int
    algorithm: str
    image: str
    arguments: dict[str, Any]
    cohort: dict[str, Any]
    limits: dict[str, Any]
    release: list[str]
    aggregator: str
    aggregator_parameters: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    launched_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime | None
    cancelled_at: datetime | None = None
    cancel_reason: str | None = None
    targets: list[TargetProgress]
    #: A sandbox study (synthetic data only) and its developer.
    sandbox: bool = False
    owner: str | None = None
    #: The data access request it runs under (None: none).
    access_request_id: str | None = None


class CountCreate(BaseModel):
    selection: CohortSelection = Field(default_factory=CohortSelection)
    spoke_ids: list[str] = Field(min_length=1)
    expires_in_hours: float = Field(24, gt=0, le=24 * 30)


class CountSpokeRead(BaseModel):
    spoke_id: str
    state: str
    count: int | None = Field(description="Matching cases, when at or above the spoke's k.")
    fewer_than: int | None = Field(description="Set instead of count for a suppressed small "
                                               "cell: the spoke has fewer than this many.")
    reason: str | None
    answered_at: datetime | None


class CountRead(BaseModel):
    id: str
    selection: dict[str, Any]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    spokes: list[CountSpokeRead]
    complete: bool = Field(description="Every target spoke answered (or refused).")
    total: int = Field(description="Sum of the exact counts: a lower bound when some cells "
                                   "are suppressed or some spokes have not answered.")
    total_is_exact: bool
    total_at_most: int | None = Field(description="Upper bound when every spoke answered a "
                                                  "number (suppressed cells count as k-1).")
    total_text: str = Field(description="The total as people should read it: '42' or "
                                        "'at least 37'.")


class CatalogSpokeRead(BaseModel):
    """One spoke in the federated catalog, as the facets select it."""

    spoke_id: str
    name: str
    institution: str
    received_at: datetime
    generated_at: datetime
    digest: str
    match: Literal["yes", "possible", "no"] = Field(description=(
        "yes: the spoke published a count for the selection, at least min_cases, and has "
        "every attribute asked for; possible: its count for the selection is not published "
        "(suppressed, or none), so it holds between 0 and cases_at_most; no: it lacks an "
        "attribute, or cannot reach min_cases."))
    cases: int | None = Field(description="The published number of cases the selection "
                                          "matches (None: not published).")
    cases_at_most: int = Field(description="Upper bound of the matching cases.")
    why: str = Field(description="Why the spoke matches or not, in words.")
    description: dict[str, Any] = Field(description="The spoke's signed description.")


class CatalogRead(BaseModel):
    """The federated catalog under the facets asked for, with the estimated cohort size:
    the sum of the published counts of the matching spokes (each at least the spoke's k),
    and the most the spokes whose count is withheld could add."""

    facets: dict[str, Any]
    spokes: list[CatalogSpokeRead]
    matching: list[str] = Field(description="Spokes that match (match == 'yes').")
    estimate: int = Field(description="Sum of the published counts of the matching spokes.")
    possible_more: int = Field(description="At most this many more cases at spokes whose "
                                           "count for the selection is withheld.")
    estimate_text: str
    modalities: list[str] = Field(description="Every modality some spoke published.")
    body_parts: list[str]
    attributes: list[str]


#: The largest initial model a launch may carry inline (safetensors, before base64).
MAX_INITIAL_MODEL_BYTES = 64 * 1024 * 1024


class TrainingStudyCreate(BaseModel):
    """A training study as a coordinator launches it: the settings of
    ``services.training.StudySpec`` and the initial global model (a safetensors file,
    base64), which the hub checks as hostile input, stores content-addressed and signs."""

    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, max_length=200)
    algorithm_id: int = Field(ge=1, le=2**63 - 1, description=(
        "The registered algorithm version to train with: approved and not revoked (its "
        "image, release signature and approval go to the spokes with every round)."))
    spokes: list[str] = Field(min_length=2, max_length=1000,
                              description="Enrolled, active spokes that take part.")
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"] = Field(
        "fedavg", description="fedavg/fedprox: the hub adds the round's mean update; "
        "fedadam/fedyogi/fedadagrad: the hub applies that server optimiser to it.")
    proximal_mu: float = Field(0.0, ge=0, allow_inf_nan=False)
    server_lr: float | None = Field(None, gt=0, le=100, allow_inf_nan=False,
                                    description="Server learning rate (default 0.1).")
    beta_1: float | None = Field(None, ge=0, lt=1, description="First-moment decay (0.9).")
    beta_2: float | None = Field(None, ge=0, lt=1, description="Second-moment decay (0.99).")
    tau: float | None = Field(None, gt=0, le=10, allow_inf_nan=False,
                              description="Adaptivity (1e-9).")
    rounds: int = Field(ge=1, le=10_000)
    min_participants: int = Field(2, ge=2)
    round_deadline_s: float = Field(600.0, gt=0, le=7 * 86400, allow_inf_nan=False)
    max_attempts: int = Field(3, ge=1, le=100)
    clip_bound: float = Field(gt=0, allow_inf_nan=False)
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    epsilon_budget: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    initial_model_b64: str = Field(
        min_length=1, max_length=(MAX_INITIAL_MODEL_BYTES * 4) // 3 + 4,
        description="The initial global model: a safetensors file, base64.")
    access_request_id: str | None = Field(None, max_length=64, description=(
        "The approved data access request the study runs under (required when the hub "
        "requires access requests); its ε budget is spent at launch."))

    _spokes = field_validator("spokes")(
        lambda spokes: [validate_spoke_id(s) for s in spokes])

    @model_validator(mode="after")
    def _optimiser(self) -> TrainingStudyCreate:
        settings_for(self.strategy, {k: getattr(self, k) for k in HYPER_PARAMETERS})
        return self


class TrainingRoundRead(BaseModel):
    """One attempt of one round. ``participants``: the spokes invited; ``joined``: those
    that trained and sent keys (with their sample counts); ``survivors``: those whose masked
    update is in the sum; ``dropouts``: joined but not in the sum. ``epsilon_round`` is one
    round's ε for a spoke that joined, ``epsilon_cumulative`` the study's after this round
    (the spoke that joined most rounds); both at the study's δ."""

    round: int
    attempt: int
    round_id: str
    stage: str
    stage_deadline: datetime
    participants: list[str]
    joined: dict[str, int]
    survivors: list[str]
    dropouts: list[str]
    epsilon_round: float | None
    epsilon_cumulative: float | None
    mean_loss: float | None
    global_model_in: str | None
    global_model_out: str | None
    outcome_reason: str | None
    opened_at: datetime
    closed_at: datetime | None


class TrainingStudyRead(BaseModel):
    """A training study's settings and state; ``epsilon_spent`` is the study's cumulative
    ε (its spoke that joined most rounds), ``rounds_done`` the aggregated rounds."""

    id: str
    name: str
    #: The image pinned by digest (``repository@sha256:...``) of the version below.
    algorithm: str
    #: The registered algorithm version the study trains with.
    algorithm_id: int | None = None
    strategy: str
    proximal_mu: float
    #: The server optimiser's settings (fedadam, fedyogi, fedadagrad), else None.
    server_optimiser: dict[str, str | float] | None = None
    rounds: int
    min_participants: int
    round_deadline_s: float
    max_attempts: int
    clip_bound: float
    noise_multiplier: float
    epsilon_budget: float
    delta: float
    spokes: list[str]
    #: running | finished | stopped_budget | failed
    state: str
    stop_reason: str | None
    global_model: str | None
    epsilon_spent: float
    rounds_done: int
    created_by: str
    created_at: datetime
    finished_at: datetime | None
    #: The data access request it runs under (None: none).
    access_request_id: str | None = None


class TrainingStudyDetail(TrainingStudyRead):
    """The study and every round attempt, in order (``round_list``)."""

    round_list: list[TrainingRoundRead]


class PsiCreate(BaseModel):
    """A private set intersection as a coordinator asks for it. The first spoke leads."""

    mode: Literal["cardinality", "intersection"]
    spoke_ids: list[str] = Field(min_length=2, max_length=16)
    purpose: str = Field(min_length=1, max_length=2000)
    expires_in_hours: float = Field(72, gt=0, le=24 * 30)
    access_request_id: str | None = Field(None, description=(
        "The approved data access request it runs under (required where the hub asks for "
        "one); the request must allow linkage and these spokes."))


class PsiSpokeRead(BaseModel):
    spoke_id: str
    leader: bool
    state: str
    reason: str | None
    updated_at: datetime


class PsiRead(BaseModel):
    id: str
    mode: str
    purpose: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    state: str
    spokes: list[PsiSpokeRead]
    count: int | None = Field(description="The shared patients, when at or above every "
                                          "reporting site's k; None otherwise.")
    fewer_than: int | None = Field(description="Set instead of count when the result is "
                                               "below a site's k.")
    result_text: str = Field(description="As people should read it: '42', 'fewer than 5', "
                                         "'linked cohort of 42', or 'pending'.")
    relayed_messages: int
    relayed_bytes: int
class AccessDecisionBody(BaseModel):
    """A committee member's decision on a data access request: approve with conditions
    (each within what was requested), or refuse with a reason."""

    model_config = {"extra": "forbid"}

    decision: Literal["approve", "refuse"]
    reason: str = Field("", max_length=2000)
    spokes: list[str] | None = Field(None, max_length=500, description=(
        "Allowed spokes (default: every requested one)."))
    attributes: list[str] | None = Field(None, max_length=500, description=(
        "Allowed attributes (default: every requested one)."))
    study_kinds: list[str] | None = Field(None, max_length=4, description=(
        "Allowed kinds of study (default: the requested ones)."))
    min_k: int | None = Field(None, ge=1, le=1_000_000, description=(
        "Smallest k a launch may run with (default: the requested k, else 5)."))
    epsilon_budget: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False,
                                         description="Total ε across training studies "
                                                     "(default: the requested ε).")
    expires_at: datetime | None = Field(None, description=(
        "When the approval lapses (default: in 365 days)."))


class AccessWithdrawBody(BaseModel):
    reason: str = Field("withdrawn by the requester", min_length=1, max_length=2000)


class AccessAttachmentRead(BaseModel):
    kind: str
    filename: str
    media_type: str
    size: int
    digest: str


class AccessVoteRead(BaseModel):
    member: str
    decision: str
    reason: str
    conditions_sha256: str | None
    at: datetime


class AccessRequestRead(BaseModel):
    """A data access request, its decision and what is bound to it."""

    id: str
    title: str
    purpose: str
    requested_by: str
    spokes: list[str]
    attributes: list[str]
    study_kinds: list[str]
    epsilon: float | None
    k: int | None
    state: str
    conditions: dict[str, Any] | None
    decided_at: datetime | None
    refusal_reason: str | None
    withdrawn_at: datetime | None
    epsilon_spent: float
    #: What is left of the ε budget for further training studies (None: no budget).
    epsilon_remaining: float | None
    created_at: datetime
    attachments: list[AccessAttachmentRead]
    votes: list[AccessVoteRead]
    experiments: list[str]
    training_studies: list[str]
    psi_runs: list[str] = []
    vertical_studies: list[str] = []
class VerticalStudyCreate(BaseModel):
    """A vertical training study (docs/cohorts.md): the PSI whose linked cohort it trains
    on, the imaging (features) spoke's and the clinical (label) spoke's attributes."""

    name: str = Field(min_length=1, max_length=200)
    psi_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    features_spoke: str
    label_spoke: str
    features_attributes: list[str] = Field(min_length=1, max_length=64)
    label_attributes: list[str] = Field(min_length=1, max_length=64)
    label: str = Field(min_length=1, max_length=128)
    positive: str | int | float | bool = Field(description="The label value that is the "
                                               "positive class.")
    rounds: int = Field(20, ge=1, le=500)
    learning_rate: float = Field(0.5, gt=0, le=10, allow_inf_nan=False)
    l2: float = Field(0.0, ge=0, le=100, allow_inf_nan=False)
    key_bits: int = Field(2048, ge=1024, le=4096)
    release_coefficients: bool = Field(False, description=(
        "Each spoke sends its coefficients to the hub at the end; otherwise they stay at "
        "the spoke and the coordinator gets the losses only."))
    access_request_id: str | None = Field(None, description=(
        "The approved data access request it runs under (required where the hub asks for "
        "one); the request must allow vertical studies, both spokes and every attribute."))

    _spokes = field_validator("features_spoke", "label_spoke")(validate_spoke_id)


class VerticalPartyRead(BaseModel):
    state: str | None = None
    reason: str | None = None
    rows: int | None = None
    features: int | None = None


class VerticalStudyRead(BaseModel):
    """A vertical study's settings and state; ``losses`` holds the training loss before
    each round's step, as the label spoke computed it."""

    id: str
    name: str
    psi_id: str
    features_spoke: str
    label_spoke: str
    features_attributes: list[str]
    label_attributes: list[str]
    label: str
    hyperparameters: dict[str, Any]
    release_coefficients: bool
    #: inviting | running | completed | refused | failed
    state: str
    reason: str | None
    round_index: int
    stage: str
    parties: dict[str, VerticalPartyRead]
    losses: list[float]
    created_by: str
    created_at: datetime
    finished_at: datetime | None


class VerticalModelRead(BaseModel):
    """The final model as the coordinator may see it: each spoke's coefficients (original
    scale of its attributes) only if the study released them, else null."""

    released: bool
    state: str
    parties: dict[str, list[dict[str, Any]] | None]
    intercept: float | None
