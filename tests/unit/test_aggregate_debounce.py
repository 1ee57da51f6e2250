"""Aggregation decoupled from ingestion: a result only marks its study stale, a debouncer
recomputes it at most once per interval (claimed in the database, so two hub processes never
both do), completion gives the final aggregate at once, and the page and the API say how
fresh the snapshot is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from signed_results import Spokes, accept, add_experiment, send_result
from sqlmodel import Session, select

from tributary.hub import worker
from tributary.hub.db import make_engine
from tributary.hub.main import create_app
from tributary.hub.models import AggregateSnapshot, Experiment, Role
from tributary.hub.services.debounce import Debouncer, claim_due
from tributary.hub.services.ingest import ingest
from tributary.hub.services.plots import PlotCache
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings
from tributary.protocol.messages import ExperimentState as SpokeState
from tributary.protocol.messages import ExperimentStatusMessage

CASES = [f"c{i}" for i in range(6)]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[TestClient, Session, Spokes]]:
    # An interval of an hour: the hub's own debouncer never runs during a test; the test
    # runs passes itself.
    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-debounce",
                                         min_cell_size=2, aggregate_interval_seconds=3600)
    with TestClient(create_app(settings)) as client, \
            Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        create_user(session, "carol", "a long enough password", [Role.COORDINATOR.value])
        token, _ = issue_token(session, "carol", "a long enough password")  # type: ignore[misc]
        client.headers["Authorization"] = f"Bearer {token}"
        spokes = Spokes(session, ["north"])
        add_experiment(session, "exp", ["north"], "summary", {})
        accept(session, "exp", "north", CASES)
        yield client, session, spokes
    worker.configure(HubSettings())


def snapshots(session: Session) -> list[AggregateSnapshot]:
    session.expire_all()
    return list(session.exec(select(AggregateSnapshot)).all())


def send(session: Session, spokes: Spokes, cases: list[str]) -> None:
    for case in cases:
        assert send_result(session, spokes, "exp", "north", case, {"score": len(case) * 0.5})


def test_a_result_marks_the_study_stale_and_aggregates_nothing(
        hub: tuple[TestClient, Session, Spokes]) -> None:
    client, session, spokes = hub
    send(session, spokes, CASES[:3])
    assert snapshots(session) == []
    assert session.get(Experiment, "exp").aggregate_stale_since is not None  # type: ignore[union-attr]
    debouncer = Debouncer(client.app.state.settings, client.app.state.engine)  # type: ignore[attr-defined]
    assert debouncer.run_once() == ["exp"]
    [snapshot] = snapshots(session)
    assert snapshot.results == 3
    assert session.get(Experiment, "exp").aggregate_stale_since is None  # type: ignore[union-attr]
    send(session, spokes, CASES[3:4])
    assert debouncer.run_once() == []  # claimed less than an interval ago: waits
    assert len(snapshots(session)) == 1


def test_two_hub_processes_never_claim_the_same_study(
        hub: tuple[TestClient, Session, Spokes]) -> None:
    client, session, spokes = hub
    send(session, spokes, CASES[:2])
    engine = client.app.state.engine  # type: ignore[attr-defined]
    with Session(engine) as first, Session(engine) as second:
        assert claim_due(first, 3600) == ["exp"]
        assert claim_due(second, 3600) == []
    with Session(engine) as later:
        assert claim_due(later, 0) == ["exp"]  # once the interval is over, it may again


def test_completion_stores_the_final_aggregate_at_once(
        hub: tuple[TestClient, Session, Spokes]) -> None:
    client, session, spokes = hub
    send(session, spokes, CASES)
    assert snapshots(session) == []
    assert ingest(session, ExperimentStatusMessage(experiment_id="exp", spoke_id="north",
                                                   state=SpokeState.COMPLETED))
    session.expire_all()
    assert session.get(Experiment, "exp").state == "completed"  # type: ignore[union-attr]
    assert [s.results for s in snapshots(session)] == [len(CASES)]
    body = client.get("/api/experiments/exp/aggregate").json()
    assert (body["results"], body["received"], body["current"]) == (6, 6, True)


def test_the_page_and_the_api_say_how_fresh_the_snapshot_is(
        hub: tuple[TestClient, Session, Spokes]) -> None:
    client, session, spokes = hub
    send(session, spokes, CASES[:3])
    Debouncer(client.app.state.settings, client.app.state.engine).run_once()  # type: ignore[attr-defined]
    send(session, spokes, CASES[3:5])
    [snapshot] = snapshots(session)
    body = client.get("/api/experiments/exp/aggregate").json()
    assert (body["results"], body["received"], body["current"]) == (3, 5, False)
    fragment = client.get("/experiments/exp/results")
    assert fragment.status_code == 200
    assert "from 3 of 5 results" in fragment.text
    assert f'datetime="{snapshot.computed_at.isoformat()}' in fragment.text
    assert "A newer snapshot is being computed." in fragment.text


def test_in_process_recomputation_takes_at_most_a_tenth_of_the_process(
        tmp_path: Path) -> None:
    settings = HubSettings.for_directory(tmp_path, aggregate_interval_seconds=2)
    debouncer = Debouncer(settings, make_engine(settings.database_url))
    assert debouncer.next_wait(0.05, now=100) == 2  # small studies: every interval
    assert debouncer.next_wait(1.5, now=200) == pytest.approx(13.5)  # a large one: 1.5 s in 15
    # After the wait, short passes (from running sums) go at the interval again.
    assert debouncer.next_wait(0.1, now=213.6) == 2


def test_short_passes_between_long_ones_keep_the_interval_and_the_share(
        tmp_path: Path) -> None:
    """A study kept by running sums: a pass of 0.1 s every interval, a full pass of 1.2 s
    every 30 s. Ten minutes of passes: snapshots about every interval, at most a tenth of
    the process; passes of 0.3 s every interval would take more, and are slowed down."""
    settings = HubSettings.for_directory(tmp_path, aggregate_interval_seconds=2)
    engine = make_engine(settings.database_url)
    for short, expect_gap in ((0.1, 2.3), (0.3, 4.5)):
        debouncer = Debouncer(settings, engine)
        now, busy, passes, last_full = 0.0, 0.0, 0, -30.0
        while now < 600:
            took = 1.2 if now - last_full >= 30 else short
            last_full = now if took == 1.2 else last_full
            now += took
            busy, passes = busy + took, passes + 1
            now += debouncer.next_wait(took, now=now)
        assert busy / now <= 0.1 + 1e-9
        assert now / passes <= expect_gap


def test_plots_are_drawn_once_per_key() -> None:
    cache, drawn = PlotCache(size=2), []

    def draw(name: str) -> str:
        drawn.append(name)
        return f"<svg>{name}</svg>"

    assert cache.get(("roc", 1), lambda: draw("a")) == "<svg>a</svg>"
    assert cache.get(("roc", 1), lambda: draw("b")) == "<svg>a</svg>"
    cache.get(("roc", 2), lambda: draw("c"))
    cache.get(("roc", 3), lambda: draw("d"))  # bounded: the least recently used goes
    cache.get(("roc", 1), lambda: draw("e"))
    assert drawn == ["a", "c", "d", "e"]


def test_a_lagging_read_leaves_the_study_to_a_debouncer_of_this_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a single-process hub the debouncer recomputes at a pace bounded to a share of
    the process; reads that found the snapshot lagging recomputed besides, unbounded."""
    from datetime import timedelta

    from tributary.hub import tasks
    from tributary.hub.models import utcnow
    from tributary.hub.services import aggregation

    asked: list[str] = []
    monkeypatch.setattr(tasks, "aggregate_in_background", asked.append)
    # A pass every 9 s at most, so within the grace (10 s); none comes during the test.
    settings = HubSettings.for_directory(tmp_path, min_cell_size=2,
                                         aggregate_interval_seconds=9)
    engine = make_engine(settings.database_url)
    worker.configure(settings, engine)  # Celery eager, as the single-process hub
    try:
        with Session(engine) as session:
            spokes = Spokes(session, ["north"])
            add_experiment(session, "exp", ["north"], "summary", {})
            accept(session, "exp", "north", CASES)
            send_result(session, spokes, "exp", "north", "c0", {"volume_ml": 1.0})
            experiment = session.get(Experiment, "exp")
            assert experiment is not None
            aggregation.latest(session, experiment, 2)  # the first snapshot
            send_result(session, spokes, "exp", "north", "c1", {"volume_ml": 2.0})
            first = snapshots(session)[-1]
            first.computed_at = utcnow() - timedelta(minutes=5)  # long past the grace
            session.add(first)
            session.commit()
            debouncer = Debouncer(settings, engine).start()
            try:
                read = aggregation.latest(session, experiment, 2)
                assert (read.version, read.current) == (1, False)
                assert asked == []  # the debouncer will get to it
            finally:
                debouncer.stop()
            aggregation.latest(session, experiment, 2)
            assert asked == ["exp"]  # no debouncer here: the read asks
    finally:
        worker.configure(HubSettings())
