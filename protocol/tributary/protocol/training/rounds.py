"""The broker messages of a training round: the SecAgg+ stages (``secagg``) wrapped with
what the round needs besides them (the global model's location and digest, the spoke's
sample count, the FedAvg weight reference). Every message is one pydantic model with a
``kind``; the transport signs each one like every other broker message.

Sample-count weighting under secure aggregation: the hub only ever sees a sum, so each
spoke scales its *clipped* update by ``num_examples / weight_reference`` (at most 1, so
the sensitivity and the privacy accounting are unchanged) before adding noise, and the hub
divides the unmasked sum by the survivors' summed weights. The sample counts themselves
are released in clear with the key advertisement (they weigh the average in any FedAvg).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from tributary.protocol import PROTOCOL_VERSION
from tributary.protocol.cohorts.access import AccessGrant
from tributary.protocol.messages import (
    AlgorithmRef,
    check_protocol_version,
    decode_with,
    new_message_id,
    utcnow,
)
from tributary.protocol.training.secagg import (
    ConsistencyRequest,
    ConsistencySignature,
    KeyAdvertisement,
    MaskedInput,
    NeighbourKeys,
    RoundConfig,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from tributary.protocol.training.update import Quantisation

Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: As on every broker message: a receiver refuses another major version.
    protocol_version: str = PROTOCOL_VERSION
    _compatible = field_validator("protocol_version")(check_protocol_version)
    #: Idempotency key, as for every broker message.
    message_id: str = Field(default_factory=new_message_id, max_length=128)
    sent_at: datetime = Field(default_factory=utcnow)


class ObjectRef(BaseModel):
    """A content-addressed object: where it is and what its bytes hash to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    digest: Digest
    location: str = Field(max_length=4096, description="Presigned URL or bucket/key.")
    size: int = Field(ge=0)


class ProtectionSettings(BaseModel):
    """What the spoke does to its update before it leaves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_bound: float = Field(gt=0, allow_inf_nan=False)
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    quantisation: Quantisation


class RoundOpen(_Message):
    """Hub -> spoke: train on this global model, then join the round's SecAgg+ stages."""

    kind: Literal["training.round_open"] = "training.round_open"
    study_id: str = Field(max_length=128)
    round_index: int = Field(ge=0)
    attempt: int = Field(ge=1)
    #: The training image, pinned by digest: the spoke runs only the one it approved.
    algorithm: str = Field(max_length=512)
    #: The same image with the publisher's release signature and the hub's approval, which
    #: a spoke agent requires (as for a validation study) before it pulls and runs it.
    image: AlgorithmRef | None = None
    secagg: RoundConfig
    global_model: ObjectRef
    #: The hub's signature over the global model's digest (hex Ed25519 / DSSE, transport's).
    global_model_signature: str = Field(max_length=4096)
    protection: ProtectionSettings
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(0.0, ge=0, allow_inf_nan=False)
    #: Where the spoke may PUT its own masked vector for this round (one object only).
    upload: str = Field(max_length=4096)
    #: The data access request the study is bound to, with the committee's conditions,
    #: for the site's data steward (optional).
    access_request: AccessGrant | None = None


class Join(_Message):
    """Spoke -> hub: stage 1 key advertisement with the sample count that weighs the site."""

    kind: Literal["training.join"] = "training.join"
    advert: KeyAdvertisement
    num_examples: int = Field(ge=1)
    loss: float | None = Field(None, allow_inf_nan=False)


class Keys(_Message):
    kind: Literal["training.keys"] = "training.keys"
    keys: NeighbourKeys
    #: The largest sample count among the spokes that joined: a spoke's weight is
    #: ``num_examples / weight_reference``.
    weight_reference: int = Field(ge=1)


class Shares(_Message):
    kind: Literal["training.shares"] = "training.shares"
    bundle: ShareBundle


class Delivery(_Message):
    kind: Literal["training.delivery"] = "training.delivery"
    delivery: ShareDelivery


class Masked(_Message):
    """Spoke -> hub: the digest of the masked vector it uploaded (never the vector)."""

    kind: Literal["training.masked"] = "training.masked"
    masked: MaskedInput
    upload: ObjectRef
    #: The spoke's signed custody statement binding ``upload`` to this round
    #: (:mod:`tributary.protocol.training.custody`).
    custody: dict[str, Any] | None = None


RefusalReason = Literal["image_not_trusted", "image_unavailable", "epsilon_cap",
                        "training_failed", "protocol"]


class Refusal(_Message):
    """Spoke -> hub: this spoke will not take part in this round attempt, and why."""

    kind: Literal["training.refusal"] = "training.refusal"
    study_id: str = Field(max_length=128)
    round_id: str = Field(max_length=200)
    round_index: int = Field(ge=0)
    attempt: int = Field(ge=1)
    reason: RefusalReason
    detail: str = Field(max_length=2000)


class Consistency(_Message):
    kind: Literal["training.consistency"] = "training.consistency"
    request: ConsistencyRequest


class Signature(_Message):
    kind: Literal["training.signature"] = "training.signature"
    signature: ConsistencySignature


class Unmask(_Message):
    kind: Literal["training.unmask"] = "training.unmask"
    request: UnmaskRequest


class UnmaskReply(_Message):
    kind: Literal["training.unmask_reply"] = "training.unmask_reply"
    response: UnmaskResponse


TrainingFromHub = Annotated[RoundOpen | Keys | Delivery | Consistency | Unmask,
                            Field(discriminator="kind")]
TrainingFromSpoke = Annotated[Join | Shares | Masked | Signature | UnmaskReply | Refusal,
                              Field(discriminator="kind")]
_from_hub: TypeAdapter[TrainingFromHub] = TypeAdapter(TrainingFromHub)
_from_spoke: TypeAdapter[TrainingFromSpoke] = TypeAdapter(TrainingFromSpoke)


def _decode(body: bytes | str, adapter: TypeAdapter) -> object:
    return decode_with(body, adapter, "training message")


def decode_training_from_hub(body: bytes | str) -> TrainingFromHub:
    """Parse a training message the hub sent, or raise :class:`ProtocolError`."""
    return _decode(body, _from_hub)  # type: ignore[return-value]


def decode_training_from_spoke(body: bytes | str) -> TrainingFromSpoke:
    """Parse a training message a spoke sent, or raise :class:`ProtocolError`."""
    return _decode(body, _from_spoke)  # type: ignore[return-value]
