"""A trained model's provenance: what a third party needs to know where a federated model
comes from and what it cost in privacy, and to check it with the hub's public key alone.
The hub writes it (``GET /api/training-studies/{id}/provenance``, ``tributary training
export``, the training study's bundle) signed as a DSSE envelope; every global model in it
carries the hub's signature over its digest, the same one the spokes checked before
training on it."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tributary.protocol.messages import ProtocolError
from tributary.protocol.signing import PublicKey, SignatureError, SigningKey, verify
from tributary.protocol.training.privacy import PrivacyLedger, study_epsilon
from tributary.protocol.training.transport import verify_model

PROVENANCE_VERSION = "1.0"
PROVENANCE_PAYLOAD_TYPE = "application/vnd.tributary.training-provenance+json"
#: Relative tolerance when an epsilon is recomputed from the ledgers.
EPSILON_RTOL = 1e-9

Digest = str


class StudySettings(BaseModel):
    """The study as it was launched."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    #: The training image, pinned (``repository@sha256:...`` or a local image id).
    algorithm: str
    image_digest: str
    strategy: str
    proximal_mu: float
    #: The server optimiser's settings (kind, server_lr, beta_1, beta_2, tau) for fedadam,
    #: fedyogi and fedadagrad; None for fedavg and fedprox.
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
    created_by: str
    created_at: datetime


class ModelRecord(BaseModel):
    """One global model: ``index`` 0 is the initial model, ``index`` k the model after the
    k-th aggregated round."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    digest: Digest = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    #: Its key in the federation's object store.
    location: str
    #: The hub's DSSE signature over ``digest`` (``training-model+sha256``).
    signature: str


class RoundRecord(BaseModel):
    """One attempt of one round: who was asked, who joined, whose masked update was summed,
    the protection it ran under and what it cost."""

    model_config = ConfigDict(extra="forbid")

    round: int
    attempt: int
    #: aggregated | retried | failed, or the open stage
    outcome: str
    outcome_reason: str | None = None
    #: The spokes the round was opened on.
    targeted: list[str]
    #: Those that joined (advertised keys, with their sample counts).
    participants: list[str]
    num_examples: dict[str, int]
    #: Those whose masked update is in the sum (survived the masking stage).
    survivors: list[str]
    clip_bound: float
    noise_multiplier: float
    delta: float
    #: Epsilon this attempt charged each participant (None: not charged, not aggregated).
    epsilon_round: float | None = None
    #: The study's cumulative epsilon after it (None: not aggregated).
    epsilon_cumulative: float | None = None
    global_model_in: Digest | None = None
    global_model_out: Digest | None = None
    mean_loss: float | None = None
    opened_at: datetime
    closed_at: datetime | None = None


class TrainingProvenance(BaseModel):
    """The provenance of a training study's models (``training-provenance`` schema)."""

    model_config = ConfigDict(extra="forbid")

    provenance_version: Literal["1.0"] = PROVENANCE_VERSION
    study: StudySettings
    #: running | finished | stopped_budget | failed
    state: str
    stop_reason: str | None = None
    finished_at: datetime | None = None
    secure_aggregation: Literal["secagg+"] = "secagg+"
    #: Where the differential-privacy noise is added (see docs/training.md).
    dp_guarantee: Literal["local, per site"] = "local, per site"
    accountant: Literal["dp-accounting RDP"] = "dp-accounting RDP"
    #: The study's cumulative epsilon at ``study.delta`` (that of the spoke that spent most).
    epsilon_spent: float
    #: Spoke id -> the rounds charged to it.
    ledgers: dict[str, PrivacyLedger]
    rounds: list[RoundRecord]
    #: Every global model, initial first.
    models: list[ModelRecord]
    #: The hub key that signed the models and this document.
    hub_keyid: str
    #: The data access request the study ran under: the request, the committee's
    #: decision and its audit events (None: not bound to one).
    access_request: dict[str, Any] | None = None

    @property
    def final_model(self) -> ModelRecord | None:
        return self.models[-1] if self.models else None


def canonical(provenance: TrainingProvenance) -> bytes:
    """The bytes the hub signs (sorted keys: the same document, the same bytes)."""
    return json.dumps(provenance.model_dump(mode="json"), sort_keys=True,
                      separators=(",", ":")).encode()


def sign_provenance(key: SigningKey, provenance: TrainingProvenance) -> dict[str, Any]:
    return key.sign(canonical(provenance), PROVENANCE_PAYLOAD_TYPE)


def open_provenance(envelope: Any, hub: PublicKey) -> TrainingProvenance:
    """The provenance in ``envelope`` if ``hub`` signed it; else :class:`ProtocolError`."""
    try:
        payload = verify(envelope, [hub], PROVENANCE_PAYLOAD_TYPE)
        return TrainingProvenance.model_validate_json(payload)
    except (SignatureError, ValueError, TypeError) as exc:
        raise ProtocolError(f"training provenance: {exc}") from None


def sha256_digest(data: bytes) -> Digest:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_model(data: bytes, record: ModelRecord, hub: PublicKey) -> None:
    """Raise :class:`ProtocolError` unless ``data`` is the model ``record`` names and the
    hub signed its digest."""
    if sha256_digest(data) != record.digest:
        raise ProtocolError(f"global model {record.index}: its bytes do not match digest "
                            f"{record.digest}")
    verify_model(record.signature, record.digest, hub)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=EPSILON_RTOL, abs_tol=1e-12)


def problems(provenance: TrainingProvenance, hub: PublicKey) -> list[str]:
    """What does not hold together in a provenance, checked with the hub's key alone: each
    model's signature; the chain of models through the aggregated rounds; each spoke's
    ledger against the rounds it joined; the epsilon figures recomputed from the ledgers."""
    found: list[str] = []
    for model in provenance.models:
        try:
            verify_model(model.signature, model.digest, hub)
        except ProtocolError as exc:
            found.append(f"model {model.index}: {exc}")
    digests = [m.digest for m in provenance.models]
    aggregated = [r for r in provenance.rounds if r.outcome == "aggregated"]
    chain = [r.global_model_in for r in aggregated[:1]] + [r.global_model_out for r in aggregated]
    if aggregated and [d for d in chain if d is not None] != digests[:len(chain)]:
        found.append("the aggregated rounds' models do not chain through the signed models")
    for spoke, ledger in sorted(provenance.ledgers.items()):
        joined = sum(spoke in r.participants for r in aggregated)
        if len(ledger.charges) != joined:
            found.append(f"{spoke}: its ledger has {len(ledger.charges)} charges, it joined "
                         f"{joined} aggregated rounds")
        if any(c.noise_multiplier != provenance.study.noise_multiplier for c in ledger.charges):
            found.append(f"{spoke}: a charge at another noise multiplier than the study's")
    try:
        spent = study_epsilon(provenance.ledgers)
    except ValueError as exc:
        return [*found, f"ledgers: {exc}"]
    if not _close(spent, provenance.epsilon_spent):
        found.append(f"epsilon_spent {provenance.epsilon_spent} but the ledgers give {spent}")
    if aggregated and aggregated[-1].epsilon_cumulative is not None and not _close(
            aggregated[-1].epsilon_cumulative, spent):
        found.append(f"the last round's cumulative epsilon {aggregated[-1].epsilon_cumulative}"
                     f" differs from the ledgers' {spent}")
    if spent > provenance.study.epsilon_budget * (1 + EPSILON_RTOL):
        found.append(f"epsilon {spent} exceeds the budget {provenance.study.epsilon_budget}")
    return found
