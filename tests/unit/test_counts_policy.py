"""Counts, release policy and the steward's desk without services: the protocol's
one-answer rule, small-cell suppression, the hub's totals and duplicate handling, and
durable steward decisions."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from tributary.hub.db import make_engine
from tributary.hub.models import Spoke
from tributary.hub.services.counts import (
    UnknownCount,
    count_read,
    create_query,
    ingest_count_reply,
)
from tributary.protocol.messages import (
    CaseStatus,
    CohortSelection,
    CountReply,
    ExperimentMessage,
    ProtocolError,
    ResultMessage,
    decode_from_spoke,
    encode,
)
from tributary.spoke.catalog import CatalogCase, refused_attributes, released_attributes
from tributary.spoke.counts import suppress
from tributary.spoke.steward import APPROVED, PENDING, REJECTED, NotPending, StewardDesk, withheld

DIGEST = "sha256:" + "0" * 64


def test_a_count_reply_carries_exactly_one_answer() -> None:
    for fields in ({}, {"count": 7, "fewer_than": 5}, {"count": 3, "refused": "no"}):
        with pytest.raises(ProtocolError, match="exactly one"):
            decode_from_spoke(encode(CountReply.model_construct(
                query_id="q", spoke_id="site-a", **fields)))
    assert decode_from_spoke(encode(CountReply(query_id="q", spoke_id="site-a",
                                               fewer_than=5))).fewer_than == 5


@pytest.mark.parametrize(("true_count", "count", "fewer_than"),
                         [(0, None, 5), (1, None, 5), (4, None, 5), (5, 5, None), (9, 9, None)])
def test_small_cells_are_suppressed(true_count: int, count: int | None,
                                    fewer_than: int | None) -> None:
    reply = suppress("q", "site-a", true_count, 5)
    assert (reply.count, reply.fewer_than) == (count, fewer_than)


def test_only_releasable_attributes_ever_leave() -> None:
    case = CatalogCase(case_id="c-1", series=[],
                       attributes={"nodules": [], "birth_year": 1950, "name": "Doe"})
    asked = ["nodules", "birth_year", "name", "absent"]
    assert released_attributes(case, asked, ["nodules"]) == {"nodules": []}
    assert released_attributes(case, asked, []) == {}
    assert refused_attributes(asked, ["nodules"]) == ["birth_year", "name", "absent"]


def test_hub_totals_are_lower_bounds_when_cells_are_suppressed(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    with Session(engine) as session:
        for spoke in ("site-a", "site-b", "site-c"):
            session.add(Spoke(id=spoke, name=spoke))
        session.commit()
        query = create_query(session, CohortSelection(), ["site-a", "site-b", "site-c"],
                             "coordinator", timedelta(hours=1))
        read = count_read(session, query)
        assert (read.complete, read.total, read.total_text) == (False, 0, "at least 0")
        assert ingest_count_reply(session, CountReply(query_id=query.id, spoke_id="site-a",
                                                      count=12))
        assert ingest_count_reply(session, CountReply(query_id=query.id, spoke_id="site-b",
                                                      fewer_than=5))
        # A second answer from the same spoke (a redelivered request) changes nothing.
        assert not ingest_count_reply(session, CountReply(query_id=query.id,
                                                          spoke_id="site-b", count=99))
        assert ingest_count_reply(session, CountReply(query_id=query.id, spoke_id="site-c",
                                                      count=8))
        read = count_read(session, query)
        assert (read.complete, read.total, read.total_is_exact) == (True, 20, False)
        assert (read.total_at_most, read.total_text) == (24, "at least 20")
        with pytest.raises(UnknownCount):
            ingest_count_reply(session, CountReply(query_id="cnt-other", spoke_id="site-a",
                                                   count=1))


def _experiment() -> ExperimentMessage:
    return ExperimentMessage.model_validate({
        "experiment_id": "exp-1", "spoke_id": "site-a", "algorithm": {
            "name": "a", "version": "1", "repository": "registry:5000/a", "digest": DIGEST}})


def test_steward_decisions_are_durable_and_single(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    desk = StewardDesk(db)
    message = _experiment()
    assert desk.hold_experiment(message, "{envelope}", {"cohort_size": 3})
    assert not desk.hold_experiment(message, "{envelope}", {"cohort_size": 3})
    result = ResultMessage(experiment_id="exp-1", spoke_id="site-a", case_id="c-1",
                           status=CaseStatus.SUCCEEDED, output={"score": 1},
                           released={"nodules": []})
    desk.hold_result(result, {"exit_code": 0})
    desk.close()

    desk = StewardDesk(db)  # a restart: everything still waits
    assert [e.experiment_id for e in desk.experiments(PENDING)] == ["exp-1"]
    assert desk.is_held("exp-1", "c-1") and not desk.is_held("exp-1", "c-2")
    desk.decide_experiment("exp-1", True, "steward", None)
    with pytest.raises(NotPending):
        desk.decide_experiment("exp-1", False, "steward", "changed my mind")
    desk.decide_result("exp-1", "c-1", False, "steward", "too specific")
    assert desk.experiment_state("exp-1") == APPROVED
    [held] = desk.results(REJECTED)
    assert held.run == {"exit_code": 0} and held.decided_by == "steward"
    out = withheld(held.result, "steward", held.reason)
    assert out.output is None and out.released == {} and out.status == CaseStatus.FAILED
    assert out.failure is not None and out.failure.reason == "withheld"
    assert "too specific" in out.failure.detail
    desk.close()


def test_a_count_within_k_of_an_earlier_one_is_refused_and_budgets_run_out(
        tmp_path: Path) -> None:
    from tributary.spoke.count_guard import CountHistory, check

    with CountHistory(tmp_path / "count_history.db") as history:
        history.record("alice", "q-1", 20)
        for differencing in (19, 16, 21, 24):
            assert "fewer than 5" in (check(history, "alice", differencing, 5, 100, 30)
                                      .refused or ""), differencing
        for fine in (20, 15, 25, 3):
            assert check(history, "alice", fine, 5, 100, 30).refused is None, fine
        assert check(history, "bob", 19, 5, 100, 30).refused is None  # per requester
        history.record("bob", "q-2", 3)
        assert check(history, "bob", 1, 5, 100, 30).refused is None  # two small cells
        history.record("bob", "q-3", None)  # a refusal spends budget too
        assert "budget" in (check(history, "bob", 50, 5, 2, 30).refused or "")
        assert check(history, "bob", 50, 5, 3, 30).refused is None
    with CountHistory(tmp_path / "count_history.db") as reopened:  # the history is durable
        assert reopened.answered("alice") == [20]


def test_counts_name_no_case_and_cap_nothing() -> None:
    from tributary.protocol.count_policy import count_selection_problem

    assert count_selection_problem(CohortSelection(min_slices=30)) is None
    assert "case_ids" in (count_selection_problem(CohortSelection(case_ids=["c-1"])) or "")
    assert "max_cases" in (count_selection_problem(CohortSelection(max_cases=3)) or "")
