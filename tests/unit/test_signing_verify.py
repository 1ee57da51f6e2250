"""The envelope check the hub runs twice for every result (message and custody record)
verifies with each key parsed once: it must refuse and accept exactly what
securesystemslib's own DSSE verification does, and leave the envelope as it was."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError

from tributary.protocol.signing import (
    MESSAGE_PAYLOAD_TYPE,
    PublicKey,
    SignatureError,
    SigningKey,
    verify,
)

ALICE, MALLORY = SigningKey.generate(), SigningKey.generate()


def library_accepts(envelope: dict[str, Any], trusted: list[PublicKey]) -> bool:
    try:
        Envelope.from_dict(copy.deepcopy(envelope)).verify([k.key for k in trusted], 1)
    except VerificationError:
        return False
    return True


def ours_accepts(envelope: dict[str, Any], trusted: list[PublicKey]) -> bool:
    before = copy.deepcopy(envelope)
    try:
        verify(envelope, trusted, MESSAGE_PAYLOAD_TYPE)
        return True
    except SignatureError:
        return False
    finally:
        assert envelope == before  # not mutated


def signed(key: SigningKey, payload: bytes = b'{"kind": "result"}') -> dict[str, Any]:
    return key.sign(payload, MESSAGE_PAYLOAD_TYPE)


def cases() -> list[tuple[str, dict[str, Any], list[PublicKey], bool]]:
    good = signed(ALICE)
    tampered = {**good, "payload": base64.b64encode(b'{"kind": "forged"}').decode()}
    # Mallory's signature presented under Alice's key id.
    impostor = signed(MALLORY)
    impostor["signatures"][0]["keyid"] = ALICE.keyid
    # A bad signature beside a good one: one trusted signature suffices (threshold 1).
    bad_sig = copy.deepcopy(good["signatures"][0])
    bad_sig["keyid"] = MALLORY.keyid
    both = {**good, "signatures": [bad_sig, *good["signatures"]]}
    flipped = copy.deepcopy(good)
    raw = bytearray(base64.b64decode(flipped["signatures"][0]["sig"]))
    raw[0] ^= 1
    flipped["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    return [
        ("good", good, [ALICE.public], True),
        ("good, among other trusted keys", good, [MALLORY.public, ALICE.public], True),
        ("untrusted signer", good, [MALLORY.public], False),
        ("tampered payload", tampered, [ALICE.public], False),
        ("impostor under a trusted key id", impostor, [ALICE.public], False),
        ("one good signature of two", both, [ALICE.public, MALLORY.public], True),
        ("one bit flipped in the signature", flipped, [ALICE.public], False),
    ]


@pytest.mark.parametrize(("name", "envelope", "trusted", "expected"), cases(),
                         ids=[c[0] for c in cases()])
def test_same_verdict_as_securesystemslib(name: str, envelope: dict[str, Any],
                                          trusted: list[PublicKey], expected: bool) -> None:
    assert library_accepts(envelope, trusted) is expected
    assert ours_accepts(envelope, trusted) is expected


def test_wrong_payload_type_and_malformed_envelopes_are_refused() -> None:
    with pytest.raises(SignatureError, match="payload type"):
        verify(ALICE.sign(b"{}", "application/other"), [ALICE.public], MESSAGE_PAYLOAD_TYPE)
    for broken in ({}, {"payload": "e30=", "payloadType": MESSAGE_PAYLOAD_TYPE},
                   {**signed(ALICE), "signatures": "nope"},
                   {**signed(ALICE), "signatures": [{"keyid": ALICE.keyid}]},
                   {**signed(ALICE), "signatures": [{"keyid": ALICE.keyid, "sig": "!!"}]}):
        with pytest.raises(SignatureError):
            verify(broken, [ALICE.public], MESSAGE_PAYLOAD_TYPE)
    with pytest.raises(SignatureError, match="no trusted key"):
        verify(signed(ALICE), [], MESSAGE_PAYLOAD_TYPE)
