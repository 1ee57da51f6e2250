"""Signed messages on the broker. Every message is a DSSE envelope around the message JSON,
signed by the sender: the hub's key for experiment messages, the spoke's enrolled key for
everything a spoke sends. Whoever can write to the broker but holds no such key cannot make
a spoke run anything, nor make the hub accept anything."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tributary.protocol.cohorts.catalog import CatalogDescriptionMessage
from tributary.protocol.cohorts.psi import PsiForward, PsiRelay, PsiRequest, PsiStatus
from tributary.protocol.messages import (
    MAX_MESSAGE_BYTES,
    ApprovalRevokedMessage,
    CancelExperimentMessage,
    CaseProgressMessage,
    CaseStartedMessage,
    CountReply,
    CountRequest,
    ExperimentMessage,
    ExperimentStatusMessage,
    HeartbeatMessage,
    ProtocolError,
    ResendRecordsMessage,
    ResultMessage,
    RetryCasesMessage,
    decode_from_hub,
    decode_from_spoke,
    encode,
)
from tributary.protocol.signing import (
    MESSAGE_PAYLOAD_TYPE,
    PublicKey,
    SignatureError,
    SigningKey,
    envelope_signer,
    verify,
)

SpokeMessage = (ExperimentStatusMessage | CaseStartedMessage | ResultMessage | CountReply
                | CaseProgressMessage | HeartbeatMessage | CatalogDescriptionMessage | PsiRelay
                | PsiStatus)
HubMessage = (ExperimentMessage | ApprovalRevokedMessage | CountRequest
              | CancelExperimentMessage | RetryCasesMessage | ResendRecordsMessage
              | PsiRequest | PsiForward)


class UntrustedMessage(ProtocolError):
    """A message that is unsigned, signed by an unknown or revoked key, or tampered with."""


def seal(message: BaseModel, key: SigningKey) -> str:
    return json.dumps(key.sign(encode(message).encode(), MESSAGE_PAYLOAD_TYPE))


class _Signature(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    keyid: str = Field(max_length=256)
    sig: str = Field(max_length=1024)


class _Envelope(BaseModel):
    """The shape of a DSSE envelope, checked before any signature code sees it: the
    signature library assumes well-typed fields and would fail with arbitrary exceptions
    on anything else (an ``AttributeError`` for a number as payload)."""

    model_config = ConfigDict(extra="allow", strict=True)

    payload: str
    payloadType: str = Field(max_length=256)  # the DSSE field name
    signatures: list[_Signature] = Field(max_length=8)


def _envelope(body: bytes | str) -> dict[str, Any]:
    """The DSSE envelope in ``body``, or :class:`ProtocolError` whatever the bytes are."""
    raw = body.encode(errors="replace") if isinstance(body, str) else body
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds the {MAX_MESSAGE_BYTES} limit")
    try:
        envelope = json.loads(raw)
    except (ValueError, RecursionError):  # deep nesting exhausts the parser's recursion
        raise ProtocolError("malformed message: not JSON, or nested too deeply") from None
    if not isinstance(envelope, dict) or "payload" not in envelope:
        raise UntrustedMessage("unsigned message: not a DSSE envelope")
    try:
        return _Envelope.model_validate(envelope).model_dump()
    except (ValidationError, RecursionError):
        raise UntrustedMessage("unsigned message: not a well-formed DSSE envelope") from None


def open_from_hub(body: bytes | str, hub_keys: Iterable[PublicKey]) -> HubMessage:
    """Verify the hub's signature, then parse; raises :class:`ProtocolError`."""
    envelope = _envelope(body)
    try:
        payload = verify(envelope, hub_keys, MESSAGE_PAYLOAD_TYPE)
    except SignatureError as exc:
        raise UntrustedMessage(f"not signed by the hub: {exc}") from None
    return decode_from_hub(payload)


KeyResolver = Callable[[str], tuple[str, PublicKey] | None]


def open_from_spoke(body: bytes | str, resolve: KeyResolver) -> tuple[SpokeMessage, str]:
    """Verify a spoke's message with the key its envelope names, which must be an active
    key enrolled for the spoke the message claims to come from. Returns (message, keyid)."""
    envelope = _envelope(body)
    try:
        keyid = envelope_signer(envelope)
    except SignatureError as exc:
        raise UntrustedMessage(str(exc)) from None
    owner = resolve(keyid)
    if owner is None:
        raise UntrustedMessage(f"signed by key {keyid[:16]}…, which is not an active enrolled key")
    spoke_id, key = owner
    try:
        payload = verify(envelope, [key], MESSAGE_PAYLOAD_TYPE)
    except SignatureError as exc:
        raise UntrustedMessage(f"bad signature from {spoke_id}: {exc}") from None
    message = decode_from_spoke(payload)
    if message.spoke_id != spoke_id:
        raise UntrustedMessage(f"message claims spoke {message.spoke_id!r} but is signed by "
                               f"{spoke_id!r}'s key")
    return message, keyid
