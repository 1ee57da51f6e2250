"""Training messages on the broker: their queues, and each message as a DSSE envelope
signed by its sender (the hub's key, or the spoke's), verified against the one key the
receiver trusts for that party. The verified key, not the message, names the sender."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from tributary.protocol.destinations import validate_federation
from tributary.protocol.messages import ProtocolError, validate_spoke_id
from tributary.protocol.signing import (
    MESSAGE_PAYLOAD_TYPE,
    PublicKey,
    SignatureError,
    SigningKey,
    verify,
)

#: What the hub signs to vouch for a global model: the object's digest.
MODEL_PAYLOAD_TYPE = "application/vnd.tributary.training-model+sha256"


def hub_training_queue(federation: str) -> str:
    return f"/queue/{validate_federation(federation)}.training"


def spoke_training_queue(spoke_id: str, federation: str) -> str:
    return f"/queue/{validate_federation(federation)}.spoke.{validate_spoke_id(spoke_id)}.training"


def seal_message(key: SigningKey, message: BaseModel) -> str:
    """The broker body: ``message`` signed by ``key``."""
    return json.dumps(key.sign(message.model_dump_json().encode(), MESSAGE_PAYLOAD_TYPE))


def open_message(body: bytes | str, trusted: Mapping[str, PublicKey],
                 decode: Callable[[bytes], Any]) -> tuple[str, Any]:
    """(sender, message) if one of ``trusted`` (party -> key) signed it; else
    :class:`ProtocolError`."""
    try:
        envelope = json.loads(body)
    except ValueError:
        raise ProtocolError("training message is not JSON") from None
    if not isinstance(envelope, dict):
        raise ProtocolError("training message is not a DSSE envelope")
    for party, key in trusted.items():
        try:
            payload = verify(envelope, [key], MESSAGE_PAYLOAD_TYPE)
        except SignatureError:
            continue
        return party, decode(payload)
    raise ProtocolError("training message not signed by a trusted party")


def sign_model(key: SigningKey, digest: str) -> str:
    return json.dumps(key.sign(digest.encode(), MODEL_PAYLOAD_TYPE))


def verify_model(signature: str, digest: str, hub: PublicKey) -> None:
    """Raise :class:`ProtocolError` unless the hub signed exactly ``digest``."""
    try:
        payload = verify(json.loads(signature), [hub], MODEL_PAYLOAD_TYPE)
    except (SignatureError, ValueError, TypeError) as exc:
        raise ProtocolError(f"global model signature: {exc}") from None
    if payload.decode() != digest:
        raise ProtocolError("the hub's signature is for another global model")
