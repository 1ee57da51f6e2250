"""Incremental aggregation: ingest keeps exact running sums per study and spoke, and a
snapshot built from them (with the last full pass's AUC, ROC curves and quantiles) is
identical to one recomputed from every result, whatever order results arrived in, in
whatever batches, redelivered, run twice, or replaced by a later attempt."""

from __future__ import annotations

import csv
import io
import math
import random
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from signed_results import DIGEST, Spokes, accept, add_experiment
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from tributary.hub.aggregation import CaseView, get_aggregator
from tributary.hub.aggregation.partial import exact, exact_square, moments, total
from tributary.hub.db import make_engine
from tributary.hub.models import (
    AggregateFull,
    AggregatePartial,
    AggregateSnapshot,
    CaseResult,
    CaseState,
    Experiment,
)
from tributary.hub.services import audit, debounce, partials
from tributary.hub.services.aggregation import _fast as fast_report
from tributary.hub.services.aggregation import (
    _full,
    _full_row,
    _views,
    inputs_digest,
    read_snapshot,
    refresh,
)
from tributary.hub.services.exports import aggregate_csv
from tributary.hub.services.ingest import ingest_batch
from tributary.protocol.messages import CaseStatus, ResultMessage

SPOKES = ["north", "south", "west"]
PARAMETERS = {"binary-classification": {"score": "p", "label": "y"}, "summary": {}}


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    audit.attach_forensic_log(engine, tmp_path / "audit.jsonl")
    return engine


def _result(rng: random.Random, spoke: str, case: str, attempt: int = 1) -> ResultMessage:
    if rng.random() < 0.1:
        failure = {"reason": rng.choice(["exit_code", "timeout"]), "detail": "x"}
        return ResultMessage(experiment_id="exp", spoke_id=spoke, case_id=case,
                             attempt=attempt, status=CaseStatus.FAILED, image_digest=DIGEST,
                             failure=failure if rng.random() < 0.8 else None,
                             finished_at=datetime.now(UTC))
    label = int(rng.random() < 0.4)
    output: dict[str, Any] = {"p": round(rng.gauss(label, 1.0), rng.choice([1, 3, 17])),
                              "volume": {"ml": rng.uniform(1e6, 1e6 + 1)}}
    if rng.random() < 0.1:
        del output["p"]  # unusable for the binary aggregator, one value fewer for summary
    if rng.random() < 0.05:
        output["big"] = 10 ** 400  # any JSON: not a number to either aggregator
    return ResultMessage(experiment_id="exp", spoke_id=spoke, case_id=case, attempt=attempt,
                         status=CaseStatus.SUCCEEDED, output=output,
                         released={"y": label} if rng.random() > 0.05 else {},
                         image_digest=DIGEST, finished_at=datetime.now(UTC))


def _without_freshness(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "full_pass"}


def _check_equal(session: Session, k: int) -> None:
    """A snapshot from the stored sums equals the full recomputation of the same results,
    and the stored sums equal the sums of every succeeded case."""
    experiment = session.get(Experiment, "exp")
    assert experiment is not None
    full = _full(session, experiment, k, inputs_digest(session, experiment, k))
    session.flush()
    row = _full_row(session, "exp")
    assert row is not None
    fast = fast_report(session, experiment, k, row)
    assert fast["full_pass"]["results"] == full["results"]
    assert _without_freshness(fast) == _without_freshness(full)
    aggregator = get_aggregator(experiment.aggregator, experiment.aggregator_parameters)
    views = _views(session, "exp")
    for spoke in SPOKES:
        expected = total(aggregator.contribution(v) for v in views
                         if v.spoke_id == spoke and v.state == CaseState.SUCCEEDED)
        assert partials.stored(session, "exp").get(spoke, {}) == expected
    session.rollback()


@pytest.mark.parametrize("aggregator", ["binary-classification", "summary"])
@pytest.mark.parametrize("seed", [1, 2])
def test_running_sums_give_the_full_recomputation_whatever_the_delivery(
        engine: Engine, aggregator: str, seed: int) -> None:
    rng = random.Random(seed)
    cases = {s: [f"{s}-{i}" for i in range(40)] for s in SPOKES}
    with Session(engine) as session:
        spokes = Spokes(session, SPOKES)
        add_experiment(session, "exp", SPOKES, aggregator, PARAMETERS[aggregator])
        for spoke in SPOKES:
            accept(session, "exp", spoke, cases[spoke])
    # Each spoke's results in its own (chain) order, the spokes interleaved at random.
    queues = {s: [spokes.sign(_result(rng, s, c)) for c in rng.sample(cases[s], 36)]
              for s in SPOKES}
    arrival: list[ResultMessage] = []
    while any(queues.values()):
        arrival.append(queues[rng.choice([s for s in SPOKES if queues[s]])].pop(0))
    delivered: list[ResultMessage] = []
    with Session(engine) as session:
        while arrival:
            batch = [arrival.pop(0) for _ in range(min(len(arrival), rng.randint(1, 15)))]
            # Redeliveries: copies inside the batch and of earlier batches.
            batch += rng.sample(batch, min(len(batch), rng.randint(0, 2)))
            batch += rng.sample(delivered, min(len(delivered), rng.randint(0, 3)))
            outcomes = ingest_batch(session, batch)
            assert not [o for o in outcomes if isinstance(o, Exception)]
            delivered += batch
            if rng.random() < 0.3:
                _check_equal(session, k=rng.choice([1, 3, 5]))
        _check_equal(session, k=5)

        # A case run twice across a crash (same attempt, another message): counts once.
        rows = session.exec(select(CaseResult).where(
            CaseResult.state == CaseState.SUCCEEDED)).all()
        twice = [spokes.sign(_result(rng, r.spoke_id, r.case_id)) for r in rows[:5]]
        assert ingest_batch(session, twice) == [False] * 5  # duplicates: no effect
        _check_equal(session, k=5)

        # Failed cases retried (as control.retry leaves them), and succeeded cases that
        # a spoke sent a later attempt of anyway: the new result replaces the old one.
        failed = session.exec(select(CaseResult).where(
            CaseResult.state == CaseState.FAILED)).all()
        session.execute(update(CaseResult).where(
            col(CaseResult.id).in_([r.id for r in failed]))
            .values(state=CaseState.QUEUED, attempt=2))
        session.commit()
        later = [spokes.sign(_result(rng, r.spoke_id, r.case_id, attempt=2))
                 for r in failed + rows[5:12]]
        outcomes = ingest_batch(session, later + later[:3])
        assert outcomes == [True] * len(later) + [False] * 3
        _check_equal(session, k=5)


def test_a_snapshot_between_full_passes_says_how_fresh_each_figure_is(
        engine: Engine) -> None:
    rng = random.Random(7)
    cases = [f"c{i}" for i in range(60)]
    with Session(engine) as session:
        spokes = Spokes(session, SPOKES)
        add_experiment(session, "exp", SPOKES, "binary-classification",
                       PARAMETERS["binary-classification"])
        for spoke in SPOKES:
            accept(session, "exp", spoke, cases)
        first = [spokes.sign(_result(rng, s, c)) for c in cases[:30] for s in SPOKES]
        ingest_batch(session, first)
        full = refresh(session, "exp", 5, full_interval=3600)
        assert full is not None
        assert read_snapshot(full).full_pass is None  # every figure as of the snapshot
        rest = [spokes.sign(_result(rng, s, c)) for c in cases[30:] for s in SPOKES]
        ingest_batch(session, rest)
        snapshot = refresh(session, "exp", 5, full_interval=3600)
        assert snapshot is not None and snapshot.version == full.version + 1
        report = read_snapshot(snapshot)
        assert report.full_pass is not None
        assert report.full_pass.results == full.results < snapshot.results == 180
        assert report.full_pass.figures == ["auc"]
        pooled = report.groups["pooled"]
        assert pooled.succeeded + pooled.failed == 180  # the counts are current
        # The CSV export says so figure by figure.
        exported = {(row["group"], row["figure"]): (row["as_of"], row["results_covered"])
                    for row in csv.DictReader(io.StringIO(aggregate_csv(report)))}
        now = (report.computed_at.isoformat(), "180")
        then = (report.full_pass.computed_at.isoformat(), str(full.results))
        assert then != now and exported[("pooled", "auc")] == then
        assert exported[("pooled", "succeeded")] == exported[("pooled", "sensitivity")] == now
        assert pooled.figures["auc"] == read_snapshot(full).groups["pooled"].figures["auc"]
        # Nothing new: no new snapshot; but the full pass is owed, so the debouncer's
        # recomputation leaves the study stale until the full pass is due, then makes it.
        assert refresh(session, "exp", 5, full_interval=3600).version == snapshot.version
        debounce.recompute(session, "exp", 5, full_interval=3600)
        assert session.get(Experiment, "exp").aggregate_stale_since is not None
        final = debounce.recompute(session, "exp", 5, full_interval=0.001)
        assert final is not None and read_snapshot(final).full_pass is None
        assert final.version == snapshot.version + 1
        session.expire_all()
        assert session.get(Experiment, "exp").aggregate_stale_since is None
        assert _full_row(session, "exp").inputs_sha256 == final.inputs_sha256


def test_studies_from_before_the_running_sums_are_recomputed_in_full(
        engine: Engine) -> None:
    rng = random.Random(3)
    with Session(engine) as session:
        spokes = Spokes(session, SPOKES)
        add_experiment(session, "exp", SPOKES, "summary", {})
        session.execute(update(Experiment).values(aggregate_incremental=False))
        session.commit()
        for spoke in SPOKES:
            accept(session, "exp", spoke, ["a", "b", "c"])
        ingest_batch(session, [spokes.sign(_result(rng, s, c))
                               for s in SPOKES for c in ("a", "b", "c")])
        assert not session.exec(select(AggregatePartial)).all()
        first = refresh(session, "exp", 1, full_interval=3600)
        ingest_batch(session, [spokes.sign(_result(rng, "north", "a", attempt=2))])
        second = refresh(session, "exp", 1, full_interval=3600)
        assert first is not None and second is not None
        assert read_snapshot(second).full_pass is None  # a full pass each time
        assert session.exec(select(AggregateSnapshot)).all()[-1].version == 2


def test_an_aggregator_that_fails_on_an_output_falls_back_to_full_passes(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from tributary.hub.aggregation.summary import SummaryAggregator

    def fragile(self: SummaryAggregator, case: CaseView) -> dict[str, int]:
        if case.output and "boom" in case.output:
            raise RecursionError("too deep")
        return original(self, case)

    original = SummaryAggregator.contribution
    monkeypatch.setattr(SummaryAggregator, "contribution", fragile)
    with Session(engine) as session:
        spokes = Spokes(session, SPOKES)
        add_experiment(session, "exp", SPOKES, "summary", {})
        accept(session, "exp", "north", ["a", "b"])
        ok = spokes.sign(ResultMessage(
            experiment_id="exp", spoke_id="north", case_id="a", status=CaseStatus.SUCCEEDED,
            output={"v": 1.0}, image_digest=DIGEST, finished_at=datetime.now(UTC)))
        boom = spokes.sign(ResultMessage(
            experiment_id="exp", spoke_id="north", case_id="b", status=CaseStatus.SUCCEEDED,
            output={"v": 2.0, "boom": 1}, image_digest=DIGEST, finished_at=datetime.now(UTC)))
        assert ingest_batch(session, [ok, boom]) == [True, True]  # stored all the same
        session.expire_all()
        assert session.get(Experiment, "exp").aggregate_incremental is False
        assert not session.exec(select(AggregatePartial)).all()
        with pytest.raises(RecursionError):  # as a full recomputation always did
            refresh(session, "exp", 1, full_interval=3600)
        session.rollback()
        monkeypatch.setattr(SummaryAggregator, "contribution", original)  # the fix
        snapshot = refresh(session, "exp", 1, full_interval=3600)
        assert snapshot is not None
        assert read_snapshot(snapshot).groups["pooled"].figures["v.n"].value == 2
        assert session.exec(select(AggregateFull)).one().results == 2


def test_exact_moments_are_the_nearest_floats_to_the_true_ones() -> None:
    rng = np.random.default_rng(5)
    for values in (rng.normal(0, 1, 50), 1e8 + rng.normal(0, 1e-3, 200),
                   np.array([5e-324, 1e308, -1e308, 3.0]), np.array([2.5])):
        n = len(values)
        s = sum(exact(v) for v in values)
        q = sum(exact_square(v) for v in values)
        mean, variance = moments(n, s, q)
        true_mean = sum(Fraction(float(v)) for v in values) / n
        assert mean == float(true_mean)
        if n > 1:
            true_var = sum((Fraction(float(v)) - true_mean) ** 2 for v in values) / (n - 1)
            assert variance == (float(true_var) if true_var < 2 ** 1024 else math.inf)
            with np.errstate(over="ignore"):
                spread = float(np.std(values, ddof=1))
            assert math.isclose(math.sqrt(variance), spread,
                                rel_tol=1e-9) or not math.isfinite(spread)
        else:
            assert variance is None


def test_the_results_fragment_says_which_figures_are_from_the_last_full_pass(
        tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from tributary.hub import worker
    from tributary.hub.main import create_app
    from tributary.hub.models import Role
    from tributary.hub.services.users import create_user, issue_token
    from tributary.hub.settings import HubSettings

    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-incr",
                                         min_cell_size=2, aggregate_interval_seconds=3600)
    rng = random.Random(11)
    try:
        with TestClient(create_app(settings)) as client, \
                Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
            create_user(session, "carol", "a long enough password", [Role.COORDINATOR.value])
            token, _ = issue_token(session, "carol", "a long enough password")  # type: ignore[misc]
            client.headers["Authorization"] = f"Bearer {token}"
            spokes = Spokes(session, SPOKES)
            add_experiment(session, "exp", SPOKES, "binary-classification",
                           PARAMETERS["binary-classification"])
            cases = [f"c{i}" for i in range(20)]
            for spoke in SPOKES:
                accept(session, "exp", spoke, cases)
            ingest_batch(session, [spokes.sign(_result(rng, s, c))
                                   for c in cases[:10] for s in SPOKES])
            assert refresh(session, "exp", 2, full_interval=3600) is not None
            fragment = client.get("/experiments/exp/results").text
            assert "data-freshness" in fragment and "data-full-pass" not in fragment
            ingest_batch(session, [spokes.sign(_result(rng, s, c))
                                   for c in cases[10:] for s in SPOKES])
            latest = refresh(session, "exp", 2, full_interval=3600)
            assert latest is not None and latest.results == 60
            fragment = client.get("/experiments/exp/results").text
            assert "data-full-pass>AUC and the ROC curves: from the last full pass" in fragment
            assert "over 30 results" in fragment
            api = client.get("/api/experiments/exp/aggregate").json()
            assert api["full_pass"]["results"] == 30 and api["results"] == 60
    finally:
        worker.configure(HubSettings())
