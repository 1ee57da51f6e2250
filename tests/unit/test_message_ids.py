"""Ids in a message name files and folders at the receiver (``runs/<experiment>/<case>``,
journal rows, bundles): every id is checked against one strict pattern at the protocol
layer, so nothing from a message can name a path outside its folder."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tributary.protocol.messages import (
    AlgorithmRef,
    CaseProgressMessage,
    CaseStartedMessage,
    CaseStatus,
    CohortSelection,
    CountReply,
    CountRequest,
    ExperimentMessage,
    ExperimentState,
    ExperimentStatusMessage,
    HeartbeatMessage,
    ProtocolError,
    ResultMessage,
    RetryCasesMessage,
    RunningCase,
    decode_from_hub,
    decode_from_spoke,
    encode,
)

HOSTILE = ["../../etc", "..", ".", "a/b", "a\\b", "", "c-1\n", "x" * 200, "/abs", "c 1",
           ".hidden", "a\x00b", "ü"]
GOOD_DIGEST = "sha256:" + "a" * 64
ALGORITHM = AlgorithmRef(name="a", version="1", repository="registry:5000/a",
                         digest=GOOD_DIGEST)


def _hub_messages() -> list[Any]:
    return [
        ExperimentMessage(experiment_id="exp-0123456789ab", spoke_id="site-a",
                          algorithm=ALGORITHM,
                          cohort=CohortSelection(case_ids=["c-0123456789abcdef"])),
        CountRequest(query_id="cnt-0123456789ab", spoke_id="site-a"),
        RetryCasesMessage(experiment_id="exp-1", spoke_id="site-a", case_ids=["c-1"],
                          attempt=2),
    ]


def _spoke_messages() -> list[Any]:
    return [
        ExperimentStatusMessage(experiment_id="exp-1", spoke_id="site-a",
                                state=ExperimentState.ACCEPTED, case_ids=["c-1"]),
        CaseStartedMessage(experiment_id="exp-1", spoke_id="site-a", case_id="c-1"),
        CaseProgressMessage(experiment_id="exp-1", spoke_id="site-a", case_id="c-1",
                            fraction=0.5),
        ResultMessage(experiment_id="exp-1", spoke_id="site-a", case_id="c-1",
                      status=CaseStatus.SUCCEEDED, output={}),
        CountReply(query_id="cnt-1", spoke_id="site-a", count=3),
        HeartbeatMessage(spoke_id="site-a", spoke_version="1", concurrency=1, queue_depth=0,
                         interval_seconds=5, running=[RunningCase(
                             experiment_id="exp-1", case_id="c-1",
                             started_at="2026-01-01T00:00:00Z")]),
    ]


def _id_paths(value: Any, path: tuple = ()) -> list[tuple]:
    """Where the ids sit in a message's JSON: every *_id, *_ids and message_id field."""
    found: list[tuple] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("_id") and isinstance(item, str):
                found.append((*path, key))
            elif key.endswith("_ids") and isinstance(item, list) and item:
                found.append((*path, key, 0))
            else:
                found.extend(_id_paths(item, (*path, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_id_paths(item, (*path, index)))
    return found


def _with(body: dict[str, Any], path: tuple, value: str) -> str:
    copy = json.loads(json.dumps(body))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return json.dumps(copy)


CASES = [(decode_from_hub, m) for m in _hub_messages()] + [
    (decode_from_spoke, m) for m in _spoke_messages()]


@pytest.mark.parametrize(("decode", "message"), CASES, ids=[m.kind for _, m in CASES])
def test_every_id_of_every_message_refuses_what_could_name_a_path(decode: Any,
                                                                 message: Any) -> None:
    body = json.loads(encode(message))
    decode(json.dumps(body))  # the message as sent is accepted
    paths = _id_paths(body)
    assert ("message_id",) in paths and len(paths) >= 2
    for path in paths:
        for hostile in HOSTILE:
            with pytest.raises(ProtocolError):
                decode(_with(body, path, hostile))


def test_the_ids_the_federation_makes_are_accepted() -> None:
    decode_from_hub(encode(RetryCasesMessage(
        experiment_id="exp-0123456789ab", spoke_id="site-a",
        case_ids=["c-0123456789abcdef", "C_1.dcm-x"], attempt=2)))
