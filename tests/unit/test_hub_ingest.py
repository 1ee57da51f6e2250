"""Result ingestion: idempotent, and only for results whose signed custody record verifies
and continues the spoke's hash chain."""
# ruff: noqa: F811 - the fixtures ``keys`` and ``session`` come from signed_results

from __future__ import annotations

import pytest
from signed_results import DIGEST, Chain, keys, result, session  # noqa: F401 - fixtures
from sqlmodel import Session, select

from tributary.hub.models import (
    CaseResult,
    Experiment,
    ExperimentState,
    SpokeChain,
)
from tributary.hub.services.aggregation import aggregate
from tributary.hub.services.gaps import GapDetected
from tributary.hub.services.ingest import Rejected, ingest
from tributary.protocol.custody import GENESIS
from tributary.protocol.messages import (
    CaseStatus,
    ExperimentStatusMessage,
    ResultMessage,
)
from tributary.protocol.messages import ExperimentState as SpokeState


def test_duplicates_count_once_and_figures_follow(session: Session, keys: dict) -> None:
    chain = Chain(keys["site-a"])
    nodule = {"center_mm": [0, 0, 0], "diameter_mm": 10}
    first = chain.sign(result("c-1", [nodule], [nodule]))
    assert ingest(session, first)
    assert not ingest(session, first)  # the same message again: a redelivery, no effect
    assert ingest(session, chain.sign(result("c-2")))
    assert ingest(session, ExperimentStatusMessage(
        experiment_id="exp-1", spoke_id="site-a", state=SpokeState.COMPLETED,
        case_ids=["c-1", "c-2"]))
    assert ingest(session, ExperimentStatusMessage(
        experiment_id="exp-1", spoke_id="site-b", state=SpokeState.REFUSED, reason="test"))
    assert len(session.exec(select(CaseResult)).all()) == 3  # c-3 still queued
    group = aggregate(session, session.get(Experiment, "exp-1"), min_cell_size=1).groups["site-a"]
    assert group.succeeded == 2 and group.figures["true_positives"].value == 1
    # The spoke says it is done but c-3 has no result here: not completed (issue 10, 22).
    assert session.get(Experiment, "exp-1").state == ExperimentState.LAUNCHED
    assert session.get(SpokeChain, "site-a").sequence == 2


def test_result_altered_after_signing_is_rejected(session: Session, keys: dict) -> None:
    signed = Chain(keys["site-a"]).sign(result("c-1", [{"center_mm": [0, 0, 0],
                                                        "diameter_mm": 5}]))
    altered = signed.model_copy(update={"output": {"findings": []}})
    with pytest.raises(Rejected, match="altered after signing"):
        ingest(session, altered)


def test_result_signed_by_another_spokes_key_is_rejected(session: Session, keys: dict) -> None:
    forged = Chain(keys["site-b"]).sign(result("c-1"))
    with pytest.raises(Rejected, match="custody record refused"):
        ingest(session, forged)


def test_replayed_result_is_rejected(session: Session, keys: dict) -> None:
    chain = Chain(keys["site-a"])
    original = chain.sign(result("c-1"))
    assert ingest(session, original)
    replay = original.model_copy(update={"message_id": "f" * 32})
    with pytest.raises(Rejected, match="replayed or conflicting"):
        ingest(session, replay)


def test_broken_chain_is_rejected(session: Session, keys: dict) -> None:
    chain = Chain(keys["site-a"])
    assert ingest(session, chain.sign(result("c-1")))
    chain.sign(result("c-2"))  # a record the hub never sees: deleted in transit
    with pytest.raises(GapDetected, match=r"records 2\.\.2"):  # see test_hub_gaps.py
        ingest(session, chain.sign(result("c-3")))
    with pytest.raises(Rejected, match="custody chain broken"):
        ingest(session, chain.sign(result("c-2"), sequence=2, previous=GENESIS))


def test_result_without_custody_is_rejected(session: Session) -> None:
    with pytest.raises(Rejected, match="no custody record"):
        ingest(session, result("c-1"))


def test_messages_from_strangers_are_rejected(session: Session) -> None:
    with pytest.raises(Rejected, match="unregistered spoke"):
        ingest(session, result("c-1", spoke="site-zz"))
    with pytest.raises(Rejected, match="does not target"):
        ingest(session, ResultMessage(experiment_id="exp-9", spoke_id="site-a", case_id="c-1",
                                      status=CaseStatus.FAILED))
