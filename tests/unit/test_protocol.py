"""The wire protocol refuses what it cannot trust, with reasons fit for a dead letter."""

import json

import pytest

from tributary.protocol.messages import (
    MAX_MESSAGE_BYTES,
    AlgorithmRef,
    CaseStatus,
    ExperimentMessage,
    ProtocolError,
    ResultMessage,
    decode_from_hub,
    decode_from_spoke,
    encode,
)

DIGEST = "sha256:" + "ab" * 32


def experiment() -> ExperimentMessage:
    return ExperimentMessage(
        experiment_id="exp-1", spoke_id="site-a",
        algorithm=AlgorithmRef(name="a", version="1", repository="127.0.0.1:5000/x/y",
                               digest=DIGEST))


def test_round_trip() -> None:
    message = experiment()
    assert decode_from_hub(encode(message)) == message
    result = ResultMessage(experiment_id="exp-1", spoke_id="site-a", case_id="c-1",
                           status=CaseStatus.SUCCEEDED, output={"n": 1})
    assert decode_from_spoke(encode(result)) == result
    assert result.idempotency_key == "exp-1/site-a/c-1/1"


@pytest.mark.parametrize(("body", "words"), [
    (b"not json", "malformed message"),
    (b"[]", "malformed message"),
    (json.dumps({"kind": "nonsense"}).encode(), "malformed message"),
])
def test_malformed_messages_are_refused(body: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        decode_from_spoke(body)


def test_unknown_protocol_version_is_refused() -> None:
    raw = json.loads(encode(experiment()))
    raw["protocol_version"] = "9.0"
    with pytest.raises(ProtocolError, match="unsupported protocol version"):
        decode_from_hub(json.dumps(raw))


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_from_spoke(b" " * (MAX_MESSAGE_BYTES + 1))


@pytest.mark.parametrize(("repository", "digest"), [
    ("127.0.0.1:5000/x/y:latest", DIGEST),
    ("127.0.0.1:5000/x/y", "latest"),
    ("127.0.0.1:5000/x/y", "sha256:" + "AB" * 32),
])
def test_algorithm_must_be_pinned_by_digest(repository: str, digest: str) -> None:
    with pytest.raises(ValueError):
        AlgorithmRef(name="a", version="1", repository=repository, digest=digest)


def test_unknown_fields_are_refused() -> None:
    raw = json.loads(encode(experiment()))
    raw["run_as_root"] = True
    with pytest.raises(ProtocolError, match="run_as_root"):
        decode_from_hub(json.dumps(raw))
