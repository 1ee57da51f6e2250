"""Whatever bytes reach a spoke's queue or the hub's results queue, the envelope parser of
each side answers with a :class:`ProtocolError` (dead-lettered with its reason) or a
message; never with another exception that would escape the consumer and stop it."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tributary.protocol.messages import MAX_MESSAGE_BYTES, ProtocolError
from tributary.protocol.signing import MESSAGE_PAYLOAD_TYPE, SigningKey
from tributary.protocol.wire import open_from_hub, open_from_spoke

KEY = SigningKey.generate()
POISON = [
    b'{"payload": 1, "payloadType": "x", "signatures": []}',  # the 52 bytes of issue 10
    b"[" * 50_000,
    b'{"payload": ' + b"[" * 50_000,
    b'{"payload": "' + b"A" * (MAX_MESSAGE_BYTES + 1) + b'"}',
    b'{"payload": "eyJ9", "payloadType": "x", "signatures": [{"keyid": [], "sig": {}}]}',
    b'{"payload": "eyJ9", "payloadType": null, "signatures": {"keyid": "a"}}',
    b'{"payload": "!!", "payloadType": "' + MESSAGE_PAYLOAD_TYPE.encode()
    + b'", "signatures": [{"keyid": "k", "sig": "zz"}]}',
    b"\xff\xfe\x00garbage",
    # Validly signed, yet the payload is poison.
    json.dumps(KEY.sign(b"[" * 50_000, MESSAGE_PAYLOAD_TYPE)).encode(),
    json.dumps(KEY.sign(b'{"kind": "heartbeat", "queue_depth": ' + b"9" * 100_000 + b"}",
                        MESSAGE_PAYLOAD_TYPE)).encode(),
    json.dumps(KEY.sign(b"\xff\xfe", MESSAGE_PAYLOAD_TYPE)).encode(),
    b"1e999999",
    b'{"payload": ' + b"9" * 100_000 + b"}",
    b'{"payload": "eyJ9", "payloadType": "x", "signatures": [' + b'{"keyid": "k", "sig": "00"},'
    * 50_000 + b"{}]}",
    b'"' + b"\\ud800" * 10 + b'"',
    b"",
]


def _resolve(keyid: str) -> tuple[str, Any] | None:
    return ("fuzz-spoke", KEY.public) if keyid == KEY.keyid else None


def _both_sides(body: bytes) -> None:
    for open_side in (lambda b: open_from_hub(b, [KEY.public]),
                      lambda b: open_from_spoke(b, _resolve)):
        with contextlib.suppress(ProtocolError):
            open_side(body)


@pytest.mark.parametrize("body", POISON, ids=range(len(POISON)))
def test_known_poison_is_a_protocol_error_on_both_sides(body: bytes) -> None:
    _both_sides(body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30)
envelope_keys = st.sampled_from(["payload", "payloadType", "signatures", "keyid", "sig",
                                 "kind", "spoke_id"])
envelopes = st.fixed_dictionaries(
    {}, optional={"payload": json_values | st.text().map(lambda t: base64.b64encode(
                      t.encode()).decode()),
                  "payloadType": json_values | st.just(MESSAGE_PAYLOAD_TYPE),
                  "signatures": json_values | st.lists(st.fixed_dictionaries(
                      {}, optional={"keyid": json_values | st.just(KEY.keyid),
                                    "sig": json_values | st.text(alphabet="0123456789abcdef")}),
                      max_size=3)}
).flatmap(lambda d: st.dictionaries(envelope_keys, json_values, max_size=3).map(
    lambda extra: {**extra, **d}))
signed_payloads = json_values | st.dictionaries(
    st.sampled_from(["kind", "spoke_id", "experiment_id", "case_id", "protocol_version",
                     "message_id", "query_id", "selection", "count"]),
    json_values | st.sampled_from(["heartbeat", "result", "experiment", "count_request",
                                   "fuzz-spoke", "1.0", "../../etc"]), max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes)
def test_random_envelopes_are_protocol_errors_or_messages(envelope: dict[str, Any]) -> None:
    _both_sides(json.dumps(envelope).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(signed_payloads)
def test_random_signed_payloads_are_protocol_errors_or_messages(payload: Any) -> None:
    """Past a valid signature, the payload itself may still be anything."""
    _both_sides(json.dumps(KEY.sign(json.dumps(payload).encode(), MESSAGE_PAYLOAD_TYPE))
                .encode())


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=30_000),
       st.sampled_from([b"[", b"{\"a\":", b"{\"payload\":["]))
def test_random_bytes_and_deep_nesting_are_protocol_errors(noise: bytes, depth: int,
                                                          opener: bytes) -> None:
    _both_sides(noise)
    _both_sides(opener * depth + noise)
