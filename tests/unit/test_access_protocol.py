"""The access grant launch messages carry is read as hostile input by the spoke: an
unknown field, a malformed id, a spoke id that could name a path, a naive expiry or
training without a budget are refused; a grant-less message from an older hub still
parses."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from tributary.protocol.cohorts.access import AccessConditions, AccessGrant
from tributary.protocol.messages import ExperimentMessage

GRANT = {"request_id": "ar-0123456789ab", "title": "t", "decided_at": "2026-12-06T10:00:00Z",
         "conditions": {"spokes": ["north"], "attributes": ["nodules"],
                        "study_kinds": ["validation"], "min_k": 5,
                        "expires_at": "2027-12-06T10:00:00Z"}}
MESSAGE = {"experiment_id": "exp-1", "spoke_id": "north", "algorithm": {
    "name": "a", "version": "1", "repository": "127.0.0.1:5000/a",
    "digest": "sha256:" + "0" * 64}}


def test_a_well_formed_grant_and_none_at_all_parse() -> None:
    message = ExperimentMessage.model_validate({**MESSAGE, "access_request": GRANT})
    assert message.access_request is not None
    assert message.access_request.conditions.attributes == ["nodules"]
    assert ExperimentMessage.model_validate(MESSAGE).access_request is None


@pytest.mark.parametrize("change", [
    {"request_id": "../../etc"},
    {"request_id": "ar-0123456789ab\n"},
    {"title": ""},
    {"title": "x" * 201},
    {"extra": 1},
    {"conditions": {**GRANT["conditions"], "spokes": ["../north"]}},
    {"conditions": {**GRANT["conditions"], "attributes": ["a b"]}},
    {"conditions": {**GRANT["conditions"], "min_k": 0}},
    {"conditions": {**GRANT["conditions"], "study_kinds": ["anything"]}},
    {"conditions": {**GRANT["conditions"], "study_kinds": ["training"]}},  # no ε budget
    {"conditions": {**GRANT["conditions"], "expires_at": "2027-12-06T10:00:00"}},
    {"conditions": {**GRANT["conditions"], "epsilon_budget": float("nan")}},
])
def test_a_malformed_grant_is_refused(change: dict) -> None:
    with pytest.raises(ValidationError):
        ExperimentMessage.model_validate({**MESSAGE, "access_request": {**GRANT, **change}})


def test_conditions_compare_equal_by_value() -> None:
    at = datetime(2027, 1, 1, tzinfo=UTC)
    one = AccessConditions(spokes=["north"], study_kinds=["validation"], expires_at=at)
    assert one == AccessConditions.model_validate(one.model_dump(mode="json"))
    assert AccessGrant(request_id="ar-0123456789ab", title="t", conditions=one,
                       decided_at=at).conditions.min_k == 5
