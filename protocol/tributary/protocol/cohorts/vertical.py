"""Vertical training's broker messages: the hub coordinates a vertical logistic regression
between two spokes that hold different columns about the same linked patients (a PSI's
linked cohort) and relays what one spoke sends the other. Every message is a pydantic model
with a ``kind``, signed by its sender like the training messages
(:mod:`tributary.protocol.training.transport`), on queues of its own.

Nothing here carries a pseudonym, a case id or a feature value: rows are aligned by the
linking table's shared order (:meth:`tributary.spoke.linkage.Linkage.cases`), vectors
travel as Paillier ciphertexts through the object store (hub-copied into the global area,
which both spokes may read), and what crosses in clear is bounded: a public key, a row
count, a few masked integers per round and one loss. The arithmetic is in
:mod:`.vertical_lr`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from tributary.protocol import PROTOCOL_VERSION
from tributary.protocol.destinations import validate_federation
from tributary.protocol.messages import (
    REASON_MAX_CHARS,
    Id,
    check_protocol_version,
    decode_with,
    new_message_id,
    utcnow,
    validate_spoke_id,
)
from tributary.protocol.training.rounds import ObjectRef

#: Most feature columns one party brings (bounds every per-feature list on the wire).
MAX_FEATURES = 64
#: Most rounds (gradient steps) of one study.
MAX_ROUNDS = 500
#: Decimal digits of one masked integer (a 2048-bit modulus has 617).
MAX_INT_DIGITS = 1300
#: Fewest linked rows a study trains on: fewer and a party's own gradient says too much
#: about the other's columns (see docs/cohorts.md).
MIN_ROWS = 20

Role = Literal["features", "label"]
Stage = Literal["share", "cross", "decrypt", "apply"]
STAGES: tuple[Stage, ...] = ("share", "cross", "decrypt", "apply")
AttributeName = Annotated[str, Field(min_length=1, max_length=128,
                                     pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
MaskedInt = Annotated[str, Field(max_length=MAX_INT_DIGITS, pattern=r"^-?[0-9]+$")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol_version: str = PROTOCOL_VERSION
    _compatible = field_validator("protocol_version")(check_protocol_version)
    message_id: Id = Field(default_factory=new_message_id)
    sent_at: datetime = Field(default_factory=utcnow)


class Hyperparameters(BaseModel):
    """Gradient descent on the (second-order Taylor) logistic loss, features standardised
    by each party on its own linked rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(20, ge=1, le=MAX_ROUNDS)
    learning_rate: float = Field(0.5, gt=0, le=10, allow_inf_nan=False)
    l2: float = Field(0.0, ge=0, le=100, allow_inf_nan=False)
    key_bits: int = Field(2048, ge=1024, le=4096, description=(
        "Paillier modulus size; 2048 or more in production (1024 only for tests)."))


class PublicKey(BaseModel):
    """A Paillier public key: its modulus n (g = n + 1, python-paillier's choice)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: str = Field(max_length=2 * 4096, pattern=r"^[0-9a-f]+$")


class Invite(_Message):
    """Hub -> spoke: take part in this vertical study with these columns of your linked
    cohort. The spoke's steward approves it before anything is read."""

    kind: Literal["vertical.invite"] = "vertical.invite"
    study_id: Id
    spoke_id: str
    psi_id: Id
    role: Role
    attributes: list[AttributeName] = Field(min_length=1, max_length=MAX_FEATURES)
    label: AttributeName | None = Field(None, description="The label's attribute (label "
                                        "party only); its values must be two classes.")
    positive: str | int | float | bool | None = Field(
        None, description="The label value counted as the positive class.")
    peer: str = Field(description="The other party's spoke id (for the audit and the steward).")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    release_coefficients: bool = False

    _spoke = field_validator("spoke_id", "peer")(validate_spoke_id)

    @model_validator(mode="after")
    def _label(self) -> Invite:
        if (self.role == "label") != (self.label is not None):
            raise ValueError("the label party, and only it, is named a label")
        if self.label is not None and self.label in self.attributes:
            raise ValueError("the label is not one of the features")
        return self


class Step(_Message):
    """Hub -> spoke: do one stage of a round. ``share``: encrypt your share of the residual
    under your own key. ``cross``: with the peer's encrypted share (``peer_object``,
    under ``peer_key``), return your masked cross-gradient (and, features party, the loss
    cross term) encrypted under the peer's key. ``decrypt``: decrypt the peer's masked
    values (``peer_object``). ``apply``: your own masked values, decrypted by the peer
    (``values``); unmask and take the gradient step."""

    kind: Literal["vertical.step"] = "vertical.step"
    study_id: Id
    spoke_id: str
    round_index: int = Field(ge=0, lt=MAX_ROUNDS)
    stage: Stage
    peer_key: PublicKey | None = None
    peer_object: ObjectRef | None = None
    values: list[MaskedInt] | None = Field(None, max_length=MAX_FEATURES + 1)
    peer_features: int | None = Field(None, ge=1, le=MAX_FEATURES + 1, description=(
        "decrypt: how many masked gradient values the peer sent (its columns)."))

    _spoke = field_validator("spoke_id")(validate_spoke_id)


class Finish(_Message):
    """Hub -> spoke: the study ended (``state``); release your coefficients if the study
    said so, then forget its keys."""

    kind: Literal["vertical.finish"] = "vertical.finish"
    study_id: Id
    spoke_id: str
    state: Literal["completed", "failed", "cancelled"]

    _spoke = field_validator("spoke_id")(validate_spoke_id)


class Status(_Message):
    """Spoke -> hub: the spoke holds the invitation for its steward, accepted it (with its
    public key and the linked cohort's size) or refused it (with why)."""

    kind: Literal["vertical.status"] = "vertical.status"
    study_id: Id
    state: Literal["held", "accepted", "refused"]
    reason: str | None = Field(None, max_length=REASON_MAX_CHARS)
    public_key: PublicKey | None = None
    rows: int | None = Field(None, ge=0)
    features: int | None = Field(None, ge=1, le=MAX_FEATURES + 1)

    @model_validator(mode="after")
    def _complete(self) -> Status:
        if self.state == "accepted" and (self.public_key is None or self.rows is None
                                         or self.features is None):
            raise ValueError("an acceptance carries the public key, rows and features")
        if self.state == "refused" and not self.reason:
            raise ValueError("a refusal says why")
        return self


class Reply(_Message):
    """Spoke -> hub: the answer to one :class:`Step`."""

    kind: Literal["vertical.reply"] = "vertical.reply"
    study_id: Id
    round_index: int = Field(ge=0, lt=MAX_ROUNDS)
    stage: Stage
    object: ObjectRef | None = Field(None, description="share, cross: the ciphertexts, in "
                                     "the spoke's own area of the object store.")
    values: list[MaskedInt] | None = Field(None, max_length=MAX_FEATURES + 1, description=(
        "decrypt: the peer's masked values, decrypted."))
    loss: float | None = Field(None, allow_inf_nan=False, description=(
        "decrypt, label party: the round's training loss (before this round's step)."))


class Coefficient(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AttributeName
    value: float = Field(allow_inf_nan=False)


class Final(_Message):
    """Spoke -> hub: the study is over here. The party's coefficients (on the original
    scale of its attributes, with its share of the intercept) only if the study released
    them; otherwise they stay at the spoke."""

    kind: Literal["vertical.final"] = "vertical.final"
    study_id: Id
    coefficients: list[Coefficient] | None = Field(None, max_length=MAX_FEATURES)
    intercept: float | None = Field(None, allow_inf_nan=False)


VerticalFromHub = Annotated[Invite | Step | Finish, Field(discriminator="kind")]
VerticalFromSpoke = Annotated[Status | Reply | Final, Field(discriminator="kind")]
_from_hub: TypeAdapter[VerticalFromHub] = TypeAdapter(VerticalFromHub)
_from_spoke: TypeAdapter[VerticalFromSpoke] = TypeAdapter(VerticalFromSpoke)


def _decode(body: bytes | str, adapter: TypeAdapter) -> object:
    return decode_with(body, adapter, "vertical message")


def decode_vertical_from_hub(body: bytes | str) -> VerticalFromHub:
    """Parse a vertical message the hub sent, or raise :class:`ProtocolError`."""
    return _decode(body, _from_hub)  # type: ignore[return-value]


def decode_vertical_from_spoke(body: bytes | str) -> VerticalFromSpoke:
    """Parse a vertical message a spoke sent, or raise :class:`ProtocolError`."""
    return _decode(body, _from_spoke)  # type: ignore[return-value]


def hub_vertical_queue(federation: str) -> str:
    return f"/queue/{validate_federation(federation)}.vertical"


def spoke_vertical_queue(spoke_id: str, federation: str) -> str:
    return (f"/queue/{validate_federation(federation)}.spoke."
            f"{validate_spoke_id(spoke_id)}.vertical")
