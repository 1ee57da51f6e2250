"""Training messages come off the broker and may be hostile (a compromised spoke, a
broker writer): each bad one is a clear ProtocolError naming what is wrong, never an
exception of another kind, and never accepted."""

from __future__ import annotations

import json

import pytest

from tributary.protocol import PROTOCOL_VERSION
from tributary.protocol.messages import MAX_MESSAGE_BYTES, ProtocolError
from tributary.protocol.training import secagg as sa
from tributary.protocol.training.rounds import (
    Join,
    decode_training_from_hub,
    decode_training_from_spoke,
)


def _join() -> dict:
    config = sa.make_round_config("study-1/round-0", ["site-a", "site-b", "site-c"], bits=32,
                                  vector_length=8)
    _, advert = sa.SecAggClient.start(config, "site-a")
    return json.loads(Join(advert=advert, num_examples=12, loss=0.5).model_dump_json())


def test_a_valid_join_decodes_and_carries_the_protocol_version() -> None:
    body = _join()
    assert body["protocol_version"] == PROTOCOL_VERSION
    assert decode_training_from_spoke(json.dumps(body)).num_examples == 12


@pytest.mark.parametrize(("change", "needle"), [
    (lambda m: m.update(protocol_version="2.0"), "unsupported protocol version"),
    (lambda m: m.update(kind="training.round_open"), "round_open"),
    (lambda m: m.update(kind="training.nonsense"), "kind"),
    (lambda m: m.update(num_examples=0), "num_examples"),
    (lambda m: m.update(num_examples="12; drop table"), "num_examples"),
    (lambda m: m.update(loss=float("nan")), "loss"),
    (lambda m: m.update(extra="field"), "extra"),
    (lambda m: m.update(message_id="x" * 10_000), "message_id"),
    (lambda m: m.pop("advert"), "advert"),
    (lambda m: m["advert"].update(sender="other-spoke" * 40), "advert"),
])
def test_malformed_spoke_messages_are_refused_with_the_reason(change, needle: str) -> None:
    body = _join()
    change(body)
    with pytest.raises(ProtocolError) as refused:
        decode_training_from_spoke(json.dumps(body, allow_nan=True))
    assert needle in str(refused.value)


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[]", b"null", b'{"kind": 3}', b"\xff\xfe\x00",
    b'{"kind": "training.round_open"}', b"{" * 100_000,
])
def test_garbage_is_a_protocol_error_on_both_sides(raw: bytes) -> None:
    for decode in (decode_training_from_hub, decode_training_from_spoke):
        with pytest.raises(ProtocolError):
            decode(raw)


def test_an_oversized_message_is_refused_unparsed() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_training_from_spoke(b" " * (MAX_MESSAGE_BYTES + 1))
