"""Message schemas exchanged over the broker. Every message is a JSON object with a
``kind`` discriminator and a ``protocol_version``; :func:`decode` is the only way either
side turns bytes from the broker into a message, so validation happens in one place."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from tributary.protocol import PROTOCOL_VERSION
from tributary.protocol.auditlog import AuditHead
from tributary.protocol.cohorts.access import AccessGrant
from tributary.protocol.cohorts.catalog import CatalogDescriptionMessage
from tributary.protocol.cohorts.psi import PsiForward, PsiRelay, PsiRequest, PsiStatus
from tributary.protocol.contract import ProgressStep, RoundedFraction
from tributary.protocol.identifiers import SPOKE_ID_RE as SPOKE_ID_RE  # re-exported
from tributary.protocol.identifiers import validate_spoke_id

#: Messages larger than this are refused before parsing.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
#: Bounds of the free-text fields a spoke sends (the channels table in docs/security.md).
REASON_MAX_CHARS = 2000  # failure details, refusal and status reasons
LOG_TAIL_MAX_BYTES = 8000  # the tail of a failed container's log, UTF-8

# Anchored for JSON schema patterns; applied with fullmatch, since "$" alone would let a
# trailing newline through.
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
#: Every other id a message carries (experiment, case, query, message): ASCII letters,
#: digits, '.', '_' and '-', starting with a letter or digit. Ids name folders and files at
#: the receiver (``runs/<experiment>/<case>``); such an id is always one harmless path
#: component, never '.', '..', a separator, a NUL or a hidden file.
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# registry[:port]/path — no tag, no digest: the digest travels separately.
REPOSITORY_RE = re.compile(r"^[a-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9._-]+)+$")


class ProtocolError(ValueError):
    """A message that cannot be accepted, with a reason fit for a dead-letter record."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_message_id() -> str:
    return uuid.uuid4().hex


def validate_id(value: str) -> str:
    if not ID_RE.fullmatch(value):
        raise ValueError("an id is 1-128 ASCII letters, digits, '.', '_' or '-', starting "
                         "with a letter or digit")
    return value


#: An experiment, case, query or message id: see :data:`ID_RE`. The pattern is stated for
#: the JSON schemas; the validator is what is relied on.
Id = Annotated[str, StringConstraints(pattern=ID_RE.pattern), AfterValidator(validate_id)]


def check_protocol_version(value: str) -> str:
    """A message's ``protocol_version`` is one this side understands: the same major
    version (minor versions only add optional fields)."""
    if value.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
        raise ValueError(
            f"unsupported protocol version {value!r}; this side speaks {PROTOCOL_VERSION}")
    return value


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol_version: str = PROTOCOL_VERSION
    message_id: Id = Field(
        default_factory=new_message_id,
        description="Idempotency key: a receiver applies each message_id at most once, so a "
        "message sent again (after a lost receipt, a reconnect or a restart) does no harm.")
    sent_at: datetime = Field(default_factory=utcnow)

    _compatible = field_validator("protocol_version")(check_protocol_version)


def validate_repository(value: str) -> str:
    match = REPOSITORY_RE.fullmatch(value)
    if not match:
        raise ValueError("repository must look like 'registry:port/path', with no tag or digest")
    if match.group(1) and not 0 < int(match.group(1)[1:]) < 65536:
        raise ValueError(f"repository port {match.group(1)[1:]} is not a TCP port")
    return value


def validate_digest(value: str) -> str:
    if not DIGEST_RE.fullmatch(value):
        raise ValueError("digest must be a manifest digest: 'sha256:' and 64 lower-case hex "
                         "digits, never a tag")
    return value


class AlgorithmRef(BaseModel):
    """An algorithm image pinned by manifest digest; a tag is never enough."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    repository: str = Field(description="Registry and repository, without tag or digest.")
    digest: str = Field(description="Manifest digest, sha256:<64 hex>.")
    release_signature: dict[str, Any] | None = Field(
        None, description="Publisher's DSSE-signed release statement for this digest.")
    approval: dict[str, Any] | None = Field(
        None, description="Hub-signed approval statement for this digest (release.py).")

    _repository = field_validator("repository")(validate_repository)
    _digest = field_validator("digest")(validate_digest)

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"


AttributeValue = str | int | float | bool


class CohortSelection(BaseModel):
    """Which of a spoke's cases an experiment runs on, as criteria over the spoke's catalog.
    Series criteria (modality, body part, slice count) must all hold for one series of the
    case, and only the matching series are handed to the algorithm."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: str | None = Field("CT", description="Only cases with a series of this modality.")
    body_part: str | None = Field(
        None, description="Only series with this BodyPartExamined (case-insensitive).")
    min_slices: int | None = Field(None, ge=1, description="Only series with at least this "
                                   "many instances.")
    max_slices: int | None = Field(None, ge=1, description="Only series with at most this "
                                   "many instances.")
    attributes: dict[str, AttributeValue] = Field(
        default_factory=dict,
        description="Only cases whose site-held attribute equals each value. A spoke refuses "
        "criteria on attributes its policy does not allow to be released.")
    case_ids: list[Id] | None = Field(None, description="Only these pseudonymous cases.")
    max_cases: int | None = Field(None, ge=1, description="At most this many cases.")

    @model_validator(mode="after")
    def _slice_range(self) -> CohortSelection:
        if (self.min_slices is not None and self.max_slices is not None
                and self.min_slices > self.max_slices):
            raise ValueError("min_slices must not exceed max_slices")
        return self


class RunLimits(BaseModel):
    """Resource limits for each algorithm container."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_seconds: int = Field(3600, ge=1, le=7 * 24 * 3600)
    memory_mb: int = Field(2048, ge=16, le=1024 * 1024)
    cpus: float = Field(1.0, gt=0, le=256)
    gpus: int = Field(0, ge=0, le=64, description=(
        "GPUs each case needs (protocol 1.4): a site offering fewer refuses the study, "
        "naming why, rather than running it without them."))
    tmp_mb: int | None = Field(None, ge=1, le=1024 * 1024, description=(
        "Size of the case's /tmp (a tmpfs, counted against memory) (protocol 1.4); unset, "
        "the site's default. The site caps it."))


class ExperimentMessage(_Message):
    """Hub → spoke: run this algorithm on the selected cases."""

    kind: Literal["experiment"] = "experiment"
    experiment_id: Id
    spoke_id: str
    algorithm: AlgorithmRef
    arguments: dict[str, Any] = Field(default_factory=dict)
    cohort: CohortSelection = Field(default_factory=CohortSelection)
    limits: RunLimits = Field(default_factory=RunLimits)
    release: list[str] = Field(
        default_factory=list,
        description="Case attributes the study asks for; the spoke releases only those its "
        "own policy allows.",
    )
    expires_at: datetime | None = None
    access_request: AccessGrant | None = Field(
        None, description="The data access request the study is bound to, with the "
        "committee's conditions, for the site's data steward (protocol 1.5, optional).")

    _spoke = field_validator("spoke_id")(validate_spoke_id)


class ApprovalRevokedMessage(_Message):
    """Hub → spoke: this algorithm version's approval was withdrawn; run nothing with it,
    including experiments already waiting in the queue. Sent with the highest priority."""

    kind: Literal["approval_revoked"] = "approval_revoked"
    spoke_id: str
    name: str
    version: str
    digest: str
    reason: str = Field(max_length=2000)

    _spoke = field_validator("spoke_id")(validate_spoke_id)
    _digest = field_validator("digest")(validate_digest)


class CountRequest(_Message):
    """Hub → spoke: how many of your cases match ``selection``? Answered from the spoke's
    own catalog with small-cell suppression; no case, pseudonym or attribute leaves."""

    kind: Literal["count_request"] = "count_request"
    query_id: Id
    spoke_id: str
    selection: CohortSelection = Field(default_factory=CohortSelection)
    expires_at: datetime | None = None
    requested_by: str | None = Field(
        None, min_length=1, max_length=200,
        description="The hub user who asked: the spoke keeps each requester's history of "
        "answers and query budget, and answers no request without one.")

    _spoke = field_validator("spoke_id")(validate_spoke_id)


class CancelExperimentMessage(_Message):
    """Hub → spoke: stop this experiment. Queued cases are dropped, running containers are
    stopped; the spoke answers with a ``cancelled`` experiment status. A cancellation that
    overtakes its experiment on the broker is remembered, and the experiment is refused when
    it arrives."""

    kind: Literal["cancel_experiment"] = "cancel_experiment"
    experiment_id: Id
    spoke_id: str
    reason: str = Field(max_length=2000)

    _spoke = field_validator("spoke_id")(validate_spoke_id)


class RetryCasesMessage(_Message):
    """Hub → spoke: run these cases of an experiment the spoke already holds again, as
    attempt ``attempt``. Only cases whose latest result failed, with a lower attempt, are
    re-run; the new attempt number is signed into each result's custody record."""

    kind: Literal["retry_cases"] = "retry_cases"
    experiment_id: Id
    spoke_id: str
    case_ids: list[Id] = Field(min_length=1, max_length=100_000)
    attempt: int = Field(ge=2, le=1000)
    reason: str | None = Field(None, max_length=2000)

    _spoke = field_validator("spoke_id")(validate_spoke_id)


class ResendRecordsMessage(_Message):
    """Hub → spoke: records of your custody chain from ``from_sequence`` on never reached
    the hub (a result message lost on the broker). The spoke publishes its journaled results
    with those records again, unchanged and in chain order; the hub ignores any it has."""

    kind: Literal["resend_records"] = "resend_records"
    spoke_id: str
    from_sequence: int = Field(ge=1)
    reason: str | None = Field(None, max_length=2000)

    _spoke = field_validator("spoke_id")(validate_spoke_id)


HubMessage = Annotated[
    ExperimentMessage | ApprovalRevokedMessage | CountRequest | CancelExperimentMessage
    | RetryCasesMessage | ResendRecordsMessage | PsiRequest | PsiForward,
    Field(discriminator="kind"),
]


class ExperimentState(StrEnum):
    ACCEPTED = "accepted"  # cases selected; case_ids lists them
    REFUSED = "refused"  # nothing will run; reason says why
    COMPLETED = "completed"  # every selected case has a published result
    HELD = "held"  # waiting for the site's data steward (experiment or results); reason says
    CANCELLED = "cancelled"  # stopped on the hub's request; case_ids: cases left without a result
    RETRY_REFUSED = "retry_refused"  # these case_ids are not re-run; reason says why


class ExperimentStatusMessage(_Message):
    """Spoke → hub: what happened to an experiment as a whole at this spoke."""

    kind: Literal["experiment_status"] = "experiment_status"
    experiment_id: Id
    spoke_id: str
    state: ExperimentState
    case_ids: list[Id] = Field(default_factory=list)
    reason: str | None = None

    _spoke = field_validator("spoke_id")(validate_spoke_id)

    @field_validator("reason")
    @classmethod
    def _bounded(cls, value: str | None) -> str | None:
        """Reasons quote refusals and stewards' words: cut, never refused, at the bound."""
        return value[:REASON_MAX_CHARS] if value is not None else None


class CaseStartedMessage(_Message):
    """Spoke → hub: a case's container has started."""

    kind: Literal["case_started"] = "case_started"
    experiment_id: Id
    spoke_id: str
    case_id: Id
    attempt: int = Field(1, ge=1)

    _spoke = field_validator("spoke_id")(validate_spoke_id)


class CaseProgressMessage(_Message):
    """Spoke → hub: how far a running case is, as the algorithm reported it in its
    progress file (see the algorithm contract). Rate-limited, capped per case, never sent
    when the site's steward reviews results, and sent non-persistent with an expiry: a lost
    progress message is harmless, the next one supersedes it. Only a rounded fraction and
    a word from a fixed vocabulary: the channel cannot carry data."""

    kind: Literal["case_progress"] = "case_progress"
    experiment_id: Id
    spoke_id: str
    case_id: Id
    attempt: int = Field(1, ge=1)
    fraction: RoundedFraction
    message: ProgressStep | None = None

    _spoke = field_validator("spoke_id")(validate_spoke_id)


class RunningCase(BaseModel):
    """One case a spoke is running right now."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment_id: Id
    case_id: Id
    attempt: int = Field(1, ge=1)
    started_at: datetime
    #: The last progress sent for this case (never newer: a heartbeat adds nothing to it).
    fraction: RoundedFraction | None = None
    message: ProgressStep | None = None


#: Most publisher keys a heartbeat lists (a site trusting more reports the first ones and
#: ``truncated``); bounds the message whatever the trust store holds.
MAX_REPORTED_PUBLISHERS = 64


class PublisherTrust(BaseModel):
    """Which publisher keys a spoke trusts now (its configuration and its trust store), so
    the hub can refuse a launch the spoke would refuse anyway, before anything is sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    required: bool = Field(description=(
        "Whether the spoke requires a release signature by one of ``keyids`` (False: it "
        "pins no publisher and runs any approved version)."))
    keyids: list[str] = Field(default_factory=list, max_length=MAX_REPORTED_PUBLISHERS)
    truncated: bool = False
    sandbox: bool = Field(False, description=(
        "The spoke holds synthetic data only and runs the hub's sandbox grants "
        "(unreviewed versions, for their own developer)."))

    @field_validator("keyids")
    @classmethod
    def _keyids(cls, value: list[str]) -> list[str]:
        for keyid in value:
            if not re.fullmatch(r"[0-9a-f]{8,128}", keyid):
                raise ValueError(f"not a key id: {keyid[:80]!r}")
        return value


class CertificateStatus(BaseModel):
    """The federation certificate a party connects with, so the hub can warn before it
    expires (the hub cannot see it: the broker terminates TLS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    serial: str = Field(max_length=64, pattern=r"^[0-9a-f]{1,64}$")
    not_after: datetime


class SiteCapacity(BaseModel):
    """What one case may have at a spoke (its ``[runner]`` caps and its executor), reported
    in heartbeats (protocol 1.5) so the hub refuses, before anything is sent, a study the
    spoke would refuse for its limits. The spoke applies the same rule itself
    (:meth:`refusal`), so an older hub or a stale report changes where, not whether."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str = Field(max_length=32, pattern=r"^[a-z0-9_-]+$", description=(
        "The executor cases run on: docker, podman or slurm."))
    max_gpus: int = Field(ge=0, le=64)
    max_tmp_mb: int = Field(ge=1, le=16 * 1024 * 1024)
    max_timeout_seconds: int = Field(ge=1, le=7 * 24 * 3600)
    max_memory_mb: int = Field(ge=1, le=16 * 1024 * 1024)
    max_cpus: float = Field(gt=0, le=1024)

    def refusal(self, asked: RunLimits) -> str | None:
        """Why this site will not run a study with these limits, or None. Time, memory,
        CPUs and /tmp are capped (the case runs with less, and the case page says so);
        GPUs are never cut down silently: a study asking for more is refused."""
        if not asked.gpus:
            return None
        if self.max_gpus == 0:
            return (f"gpus: the study asks for {asked.gpus} GPU(s) per case; this site offers "
                    "none ([runner] max_gpus = 0)")
        if asked.gpus > self.max_gpus:
            return (f"gpus: the study asks for {asked.gpus} GPUs per case; this site offers "
                    f"at most {self.max_gpus} ([runner] max_gpus)")
        if self.engine == "podman":
            return ("gpus: this site runs cases with Podman, whose Docker-compatible API does "
                    "not pass GPU device requests; the site must use the Docker engine or "
                    "Slurm")
        return None


class HeartbeatMessage(_Message):
    """Spoke → hub, every few seconds: the spoke is alive, what it runs and what waits.
    Sent non-persistent with an expiry, so heartbeats never pile up while the hub is away."""

    kind: Literal["heartbeat"] = "heartbeat"
    spoke_id: str
    spoke_version: str
    concurrency: int = Field(ge=1, description="Cases this spoke runs at once.")
    queue_depth: int = Field(ge=0, description="Cases journaled and waiting to run.")
    running: list[RunningCase] = Field(default_factory=list)
    outbox_depth: int = Field(0, ge=0, description="Messages journaled and not yet sent.")
    interval_seconds: float = Field(gt=0, description="When the next heartbeat is due.")
    audit_head: AuditHead | None = Field(None, description=(
        "The head of the spoke's audit log, which the hub keeps as an anchor: a log later "
        "cut or recreated no longer reaches it."))
    certificate: CertificateStatus | None = Field(None, description=(
        "The spoke's broker client certificate (mutual TLS), for expiry monitoring."))
    trust: PublisherTrust | None = Field(None, description=(
        "The publisher keys the spoke trusts (protocol 1.2; absent from older spokes)."))
    capacity: SiteCapacity | None = Field(None, description=(
        "What one case may have here (protocol 1.5; absent from older spokes)."))

    _spoke = field_validator("spoke_id")(validate_spoke_id)


class FailureReason(StrEnum):
    EXIT_CODE = "exit_code"
    INVALID_ARGUMENTS = "invalid_arguments"
    UNSUITABLE_INPUT = "unsuitable_input"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    MISSING_OUTPUT = "missing_output"
    INVALID_OUTPUT = "invalid_output"
    OUTPUT_TOO_LARGE = "output_too_large"
    OUTPUT_QUOTA = "output_quota"  # the algorithm filled its size-limited output folder
    IMAGE_UNAVAILABLE = "image_unavailable"
    IMAGE_DIGEST_MISMATCH = "image_digest_mismatch"
    IMAGE_NOT_TRUSTED = "image_not_trusted"
    INPUT_ERROR = "input_error"
    INTERNAL_ERROR = "internal_error"
    WITHHELD = "withheld"  # the site's data steward did not release the output; detail: why
    KILLED = "killed"  # the container was killed by someone other than the spoke
    CANCELLED = "cancelled"  # stopped because the hub cancelled the experiment
    INTERRUPTED = "interrupted"  # the spoke went down mid-case too often to go on retrying


MAX_DISCARDED_FILES = 50
DISCARDED_NAME_MAX_CHARS = 255


class AppliedLimits(BaseModel):
    """The limits a case actually ran under, after the site's caps (protocol 1.3): shown to
    the developer instead of the requested ones. Every field is a small bounded number."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_seconds: int | None = Field(None, ge=1, le=7 * 24 * 3600)
    memory_mb: int | None = Field(None, ge=1, le=16 * 1024 * 1024)
    cpus: float | None = Field(None, gt=0, le=1024)
    gpus: int | None = Field(None, ge=0, le=64)
    tmp_mb: int | None = Field(None, ge=0, le=16 * 1024 * 1024)


class DiscardedFile(BaseModel):
    """A file the algorithm left in its output folder besides output.json and progress.json:
    discarded by the spoke; only its (cut) name and size leave the site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(max_length=DISCARDED_NAME_MAX_CHARS)
    size_bytes: int = Field(ge=0)


class Failure(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: FailureReason
    detail: str = Field(max_length=REASON_MAX_CHARS)
    exit_code: int | None = None
    log_tail: str | None = Field(None, max_length=LOG_TAIL_MAX_BYTES)
    log_withheld: bool = Field(False, description=(
        "The site's data-release policy withholds log tails: none was sent (protocol 1.3)."))
    applied_limits: AppliedLimits | None = Field(None, description=(
        "The limits the case ran under after the site's caps (protocol 1.3)."))
    discarded_files: list[DiscardedFile] = Field(
        default_factory=list, max_length=MAX_DISCARDED_FILES, description=(
            "Files discarded from the output folder, names and sizes only (protocol 1.3)."))


class CaseStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ResultMessage(_Message):
    """Spoke → hub: the outcome of one case. Only ``output`` (the algorithm's output.json)
    and the attributes the spoke's policy released ever leave the institution."""

    kind: Literal["result"] = "result"
    experiment_id: Id
    spoke_id: str
    case_id: Id
    attempt: int = Field(1, ge=1)
    status: CaseStatus
    output: dict[str, Any] | None = None
    failure: Failure | None = None
    released: dict[str, Any] = Field(default_factory=dict)
    image_digest: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    custody: dict[str, Any] | None = Field(
        None, description="DSSE envelope of the spoke-signed custody record (see custody.py).")

    _spoke = field_validator("spoke_id")(validate_spoke_id)

    @property
    def idempotency_key(self) -> str:
        """One accepted result per (experiment, spoke, case, attempt), however often sent."""
        return f"{self.experiment_id}/{self.spoke_id}/{self.case_id}/{self.attempt}"


class CountReply(_Message):
    """Spoke → hub: the answer to a :class:`CountRequest`. Exactly one of ``count`` (the
    number of matching cases, at least ``threshold``), ``fewer_than`` (a small cell the
    spoke's policy suppresses: 0 ≤ count < ``fewer_than``) or ``refused`` (with why)."""

    kind: Literal["count_reply"] = "count_reply"
    query_id: Id
    spoke_id: str
    count: int | None = Field(None, ge=0)
    fewer_than: int | None = Field(None, ge=1)
    refused: str | None = Field(None, max_length=2000)

    _spoke = field_validator("spoke_id")(validate_spoke_id)

    @model_validator(mode="after")
    def _one_answer(self) -> CountReply:
        if sum(v is not None for v in (self.count, self.fewer_than, self.refused)) != 1:
            raise ValueError("a count reply carries exactly one of count, fewer_than, refused")
        return self


SpokeMessage = Annotated[
    ExperimentStatusMessage | CaseStartedMessage | ResultMessage | CountReply
    | CaseProgressMessage | HeartbeatMessage | CatalogDescriptionMessage | PsiRelay | PsiStatus,
    Field(discriminator="kind"),
]
_spoke_adapter: TypeAdapter[Any] = TypeAdapter(SpokeMessage)
_hub_adapter: TypeAdapter[Any] = TypeAdapter(HubMessage)


def encode(message: BaseModel) -> str:
    return message.model_dump_json()


def decode_with(body: bytes | str, adapter: TypeAdapter[Any], what: str = "message") -> Any:
    """Bytes from the broker to one of ``adapter``'s models, bounded and validated, or
    :class:`ProtocolError` naming at most five problems (``what``: the kind of message)."""
    raw = body.encode() if isinstance(body, str) else body
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds the {MAX_MESSAGE_BYTES} limit")
    try:
        return adapter.validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise ProtocolError(f"malformed {what}: {problems}") from None


def decode_from_spoke(
    body: bytes | str,
) -> (ExperimentStatusMessage | CaseStartedMessage | ResultMessage | CountReply
      | CaseProgressMessage | HeartbeatMessage | CatalogDescriptionMessage | PsiRelay | PsiStatus):
    """Parse a message a spoke sent to the hub, or raise :class:`ProtocolError`."""
    return decode_with(body, _spoke_adapter)


def decode_from_hub(body: bytes | str) -> (ExperimentMessage | ApprovalRevokedMessage
                                           | CountRequest | CancelExperimentMessage
                                           | RetryCasesMessage | ResendRecordsMessage
                                           | PsiRequest | PsiForward):
    """Parse a message the hub sent to a spoke, or raise :class:`ProtocolError`."""
    return decode_with(body, _hub_adapter)
