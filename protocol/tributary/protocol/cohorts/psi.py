"""Private set intersection (PSI) on the wire: spokes find the patients they share, by an
identifier they agree on, without showing anyone else to each other or to the hub.

The hub asks each participating spoke (:class:`PsiRequest`, hub-signed, naming every
participant and its enrolled key); a spoke's data steward approves or refuses; the spokes
then talk to each other only through the hub, which relays each spoke-signed
:class:`PsiRelay` to its addressee as a hub-signed :class:`PsiForward`. Every relayed
payload except the key-agreement ``hello`` is encrypted under a key the two spokes agreed
by X25519 (the hub cannot read it); the ``hello`` itself carries only an ephemeral public
key, signed by the sending spoke's enrolled key. Each spoke reports its state and, once
done, a suppressed size (:class:`PsiStatus`).

This module imports nothing from :mod:`tributary.protocol.messages` (which registers these
kinds in its unions), so it carries its own copies of the id rules."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from tributary.protocol import PROTOCOL_VERSION

#: Longest base64 payload one relayed message carries (about 1 MB of bytes): a partner's
#: response holding both sites' blinded sets, some 22,000 identifiers together (about
#: 11,000 a site). Bigger sets are refused by the spoke before anything is sent.
MAX_PAYLOAD_CHARS = 1_400_000
#: Most spokes in one PSI.
MAX_PARTICIPANTS = 16
#: The DSSE payload type of the signed ``hello`` (a spoke's ephemeral X25519 key).
HELLO_PAYLOAD_TYPE = "application/vnd.tributary.psi-hello+json"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SPOKE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_B64_RE = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def _id(value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise ValueError("an id is 1-128 ASCII letters, digits, '.', '_' or '-'")
    return value


def _spoke(value: str) -> str:
    if not _SPOKE_RE.fullmatch(value):
        raise ValueError("spoke id must be 2-63 lower-case letters, digits or '-'")
    return value


def _b64(value: str) -> str:
    if not _B64_RE.fullmatch(value):
        raise ValueError("payload must be standard base64")
    return value


PsiId = Annotated[str, AfterValidator(_id)]
SpokeId = Annotated[str, AfterValidator(_spoke)]
Payload = Annotated[str, Field(max_length=MAX_PAYLOAD_CHARS), AfterValidator(_b64)]


class PsiMode(StrEnum):
    CARDINALITY = "cardinality"  # how many patients all participants share, nothing else
    INTERSECTION = "intersection"  # each spoke gets PSI-scoped linking pseudonyms


class PsiStep(StrEnum):
    HELLO = "hello"  # leader <-> partner: signed ephemeral X25519 public key
    REQUEST = "request"  # leader -> partner: the PSI client's blinded request
    RESPONSE = "response"  # partner -> leader: the PSI server's setup and response
    LINK = "link"  # leader -> partner: the PSI key and the shared pseudonyms (intersection)


class PsiState(StrEnum):
    HELD = "held"  # waiting for the site's data steward
    APPROVED = "approved"  # the steward approved; the spoke takes part
    REFUSED = "refused"  # the steward (or the spoke's policy) refused; reason says why
    DONE = "done"  # the spoke's part is finished
    FAILED = "failed"  # the protocol broke off at this spoke; reason says why


class _PsiMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol_version: str = PROTOCOL_VERSION
    message_id: PsiId = Field(default_factory=lambda: uuid.uuid4().hex)
    sent_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("protocol_version")
    @classmethod
    def _compatible(cls, value: str) -> str:
        if value.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
            raise ValueError(f"unsupported protocol version {value!r}")
        return value


class PsiParticipant(BaseModel):
    """A spoke taking part, with the enrolled key its ``hello`` must be signed with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spoke_id: SpokeId
    public_key_pem: str = Field(max_length=1000)


class PsiRequest(_PsiMessage):
    """Hub → spoke: take part in this PSI. The first participant is the leader (the PSI
    client of every other participant)."""

    kind: Literal["psi_request"] = "psi_request"
    psi_id: PsiId
    spoke_id: SpokeId
    mode: PsiMode
    participants: list[PsiParticipant] = Field(min_length=2, max_length=MAX_PARTICIPANTS)
    purpose: str = Field(min_length=1, max_length=2000)
    requested_by: str = Field(min_length=1, max_length=200)
    expires_at: datetime | None = None

    @model_validator(mode="after")
    def _participants(self) -> PsiRequest:
        ids = [p.spoke_id for p in self.participants]
        if len(set(ids)) != len(ids):
            raise ValueError("a spoke is listed twice")
        if self.spoke_id not in ids:
            raise ValueError("the addressed spoke is not a participant")
        return self

    @property
    def leader(self) -> str:
        return self.participants[0].spoke_id

    def partners_of(self, spoke_id: str) -> list[str]:
        """Whom ``spoke_id`` talks to: the leader talks to everyone, a partner to the
        leader only."""
        if spoke_id == self.leader:
            return [p.spoke_id for p in self.participants[1:]]
        return [self.leader]

    def key_of(self, spoke_id: str) -> str | None:
        return next((p.public_key_pem for p in self.participants if p.spoke_id == spoke_id),
                    None)


class PsiRelay(_PsiMessage):
    """Spoke → hub: relay ``payload`` to ``to_spoke``. Signed by the sending spoke."""

    kind: Literal["psi_relay"] = "psi_relay"
    psi_id: PsiId
    spoke_id: SpokeId
    to_spoke: SpokeId
    step: PsiStep
    payload: Payload


class PsiForward(_PsiMessage):
    """Hub → spoke: what ``from_spoke`` relayed (its message ``relay_message_id``, the
    receiver's idempotency key), unchanged."""

    kind: Literal["psi_forward"] = "psi_forward"
    psi_id: PsiId
    spoke_id: SpokeId
    from_spoke: SpokeId
    step: PsiStep
    payload: Payload
    relay_message_id: PsiId


class PsiStatus(_PsiMessage):
    """Spoke → hub: this spoke's state in a PSI. A finished leader reports the shared
    count (``count``, or ``fewer_than`` its k); in intersection mode each spoke reports the
    size of the linked cohort it keeps the same way."""

    kind: Literal["psi_status"] = "psi_status"
    psi_id: PsiId
    spoke_id: SpokeId
    state: PsiState
    reason: str | None = Field(None, max_length=2000)
    count: int | None = Field(None, ge=0)
    fewer_than: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_size(self) -> PsiStatus:
        if self.count is not None and self.fewer_than is not None:
            raise ValueError("a PSI status carries count or fewer_than, not both")
        return self


class PsiHello(BaseModel):
    """The signed content of a ``hello``: who offers which ephemeral X25519 key to whom,
    for which PSI. Bound to all three, so a hello cannot be replayed elsewhere."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    psi_id: PsiId
    from_spoke: SpokeId
    to_spoke: SpokeId
    x25519_public: str = Field(max_length=64)
