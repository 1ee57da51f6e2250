"""The hub's results and aggregate API on a real database: aggregates are re-computed as
each signed result is ingested (one snapshot version per change, read without
recomputing), small cells are suppressed in every aggregate export, and the per-case
results export carries what the spokes released."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from signed_results import Spokes, accept, add_experiment, send_result
from sqlmodel import Session, select

from tributary.hub import worker
from tributary.hub.main import create_app
from tributary.hub.models import AggregateSnapshot, AuditEvent, Experiment, Role
from tributary.hub.services import aggregation, debounce
from tributary.hub.services.aggregation import aggregate
from tributary.hub.services.debounce import Debouncer
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings

PARAMETERS = {"score": "prediction.p", "label": "diagnosis"}
# north: 12 cases, 6 positives / 6 negatives; east: 3 cases (a small cell)
NORTH = [(0.9, 1), (0.8, 1), (0.75, 1), (0.4, 1), (0.65, 1), (0.3, 1),
         (0.2, 0), (0.35, 0), (0.6, 0), (0.1, 0), (0.05, 0), (0.45, 0)]
EAST = [(0.7, 1), (0.2, 0), (0.9, 1)]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[TestClient, Session]]:
    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-results",
                                         min_cell_size=5, aggregate_interval_seconds=3600)
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        with Session(engine) as session:
            create_user(session, "carol", "a long enough password", [Role.COORDINATOR.value])
            create_user(session, "rita", "a long enough password", [Role.REVIEWER.value])
            token, _ = issue_token(session, "carol", "a long enough password")  # type: ignore[misc]
            client.headers["Authorization"] = f"Bearer {token}"
            yield client, session
    worker.configure(HubSettings())  # back to the unconfigured default for other tests


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def versions(session: Session, experiment_id: str) -> list[int]:
    session.expire_all()
    return [s.version for s in session.exec(select(AggregateSnapshot).where(
        AggregateSnapshot.experiment_id == experiment_id).order_by(AggregateSnapshot.version))]


def settle(client: TestClient) -> None:
    """One pass of the hub's debouncer, due at once (what it does every interval), with a
    full pass each time (test_incremental_aggregation.py covers the passes in between)."""
    app = client.app  # type: ignore[attr-defined]
    settings = app.state.settings.model_copy(update={"aggregate_interval_seconds": 1e-9,
                                                     "aggregate_full_interval_seconds": 1e-9})
    Debouncer(settings, app.state.engine).run_once()


def run_study(session: Session) -> Spokes:
    spokes = Spokes(session, ["north", "east"])
    add_experiment(session, "exp-roc", ["north", "east"], "binary-classification", PARAMETERS)
    accept(session, "exp-roc", "north", [f"n{i}" for i in range(len(NORTH))] + ["n-fail"])
    accept(session, "exp-roc", "east", [f"e{i}" for i in range(len(EAST))])
    return spokes


def test_aggregate_follows_results_as_they_arrive(hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    spokes = run_study(session)
    assert versions(session, "exp-roc") == []
    for i, (p, y) in enumerate(NORTH):
        assert send_result(session, spokes, "exp-roc", "north", f"n{i}",
                           {"prediction": {"p": p}}, {"diagnosis": y})
        # a result only marks the study stale; each debouncer pass stores one new snapshot
        settle(client)
        assert versions(session, "exp-roc") == list(range(1, i + 2))
        latest = session.exec(select(AggregateSnapshot).where(
            AggregateSnapshot.version == i + 1)).one()
        assert latest.results == i + 1
    report = client.get("/api/experiments/exp-roc/aggregate").json()
    assert report["version"] == len(NORTH) and report["current"] is True
    assert versions(session, "exp-roc") == list(range(1, len(NORTH) + 1))  # read: no recompute
    # The stored snapshot equals a fresh computation.
    fresh = aggregate(session, session.get(Experiment, "exp-roc"), 5)
    assert report["groups"] == json.loads(fresh.model_dump_json())["groups"]
    north = report["groups"]["north"]["figures"]
    assert north["auc"]["value"] == pytest.approx(31 / 36, abs=1e-4)  # 5 of 36 pairs misordered
    assert north["sensitivity"]["value"] == pytest.approx(4 / 6, abs=1e-4)

    # A failed case and a redelivered result: one more version, then none.
    assert send_result(session, spokes, "exp-roc", "north", "n-fail", None, failed=True)
    settle(client)
    assert versions(session, "exp-roc")[-1] == len(NORTH) + 1
    report = client.get("/api/experiments/exp-roc/aggregate").json()
    assert report["groups"]["north"]["failed"] == 1
    assert report["groups"]["north"]["failure_reasons"] == {"exit_code": 1}
    history = client.get("/api/experiments/exp-roc/aggregate/versions").json()
    assert [h["version"] for h in history] == list(range(1, len(NORTH) + 2))
    old = client.get("/api/experiments/exp-roc/aggregate", params={"version": 3}).json()
    assert old["results"] == 3 and old["current"] is False
    assert client.get("/api/experiments/exp-roc/aggregate",
                      params={"version": 99}).status_code == 404


def test_a_lost_task_is_caught_up_on_read(hub: tuple[TestClient, Session],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    client, session = hub
    spokes = run_study(session)
    send_result(session, spokes, "exp-roc", "north", "n0", {"prediction": {"p": 0.9}},
                {"diagnosis": 1})
    settle(client)
    engine = client.app.state.engine  # type: ignore[attr-defined]
    worker.configure(client.app.state.settings)  # no engine: tasks are dropped, as if lost
    send_result(session, spokes, "exp-roc", "north", "n1", {"prediction": {"p": 0.8}},
                {"diagnosis": 1})  # and no debouncer pass follows
    stale = client.get("/api/experiments/exp-roc/aggregate").json()
    assert (stale["version"], stale["results"], stale["current"]) == (1, 1, False)
    assert stale["received"] == 2  # the snapshot says what it does not cover yet
    worker.configure(client.app.state.settings, engine)  # the hub can run tasks again
    assert client.get("/api/experiments/exp-roc/aggregate").json()["current"] is False
    monkeypatch.setattr(aggregation, "STALE_GRACE", timedelta(0))  # ... and the grace is over
    client.get("/api/experiments/exp-roc/aggregate")  # asks for it, in the background
    caught_up = until_current(client)
    assert (caught_up["version"], caught_up["results"], caught_up["current"]) == (2, 2, True)


def until_current(client: TestClient) -> dict[str, Any]:
    for _ in range(150):
        report = client.get("/api/experiments/exp-roc/aggregate").json()
        if report["current"]:
            return report
        time.sleep(0.1)
    raise AssertionError("the aggregate never caught up")


def test_a_read_that_finds_the_snapshot_lagging_does_not_wait_for_it(
        hub: tuple[TestClient, Session], monkeypatch: pytest.MonkeyPatch) -> None:
    """In a single-process hub (Celery eager) the read that found the snapshot older than
    the grace recomputed it itself, and waited: the experiment page's outliers of seconds
    at 30,000 cases. It must ask and return."""
    client, session = hub
    spokes = run_study(session)
    send_result(session, spokes, "exp-roc", "north", "n0", {"prediction": {"p": 0.9}},
                {"diagnosis": 1})
    settle(client)
    send_result(session, spokes, "exp-roc", "north", "n1", {"prediction": {"p": 0.8}},
                {"diagnosis": 1})  # and no debouncer pass follows
    monkeypatch.setattr(aggregation, "STALE_GRACE", timedelta(0))
    answered = threading.Event()
    waited_for_the_read: list[bool] = []
    original = debounce.refresh

    def after_the_read(*args: Any, **kwargs: Any) -> Any:
        waited_for_the_read.append(answered.wait(timeout=5))
        return original(*args, **kwargs)

    monkeypatch.setattr(debounce, "refresh", after_the_read)
    lagging = client.get("/api/experiments/exp-roc/aggregate").json()
    answered.set()
    assert (lagging["version"], lagging["current"], lagging["received"]) == (1, False, 2)
    assert until_current(client)["version"] == 2
    assert waited_for_the_read == [True]  # the recomputation ran after the read answered


def figure_rows(rows: list[dict[str, str]], group: str) -> dict[str, dict[str, str]]:
    return {r["figure"]: r for r in rows if r["group"] == group}


def test_small_cells_are_suppressed_in_every_export(hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    spokes = run_study(session)
    for spoke, data, prefix in (("north", NORTH, "n"), ("east", EAST, "e")):
        for i, (p, y) in enumerate(data):
            send_result(session, spokes, "exp-roc", spoke, f"{prefix}{i}",
                        {"prediction": {"p": p}, "note": "=HYPERLINK(1)"}, {"diagnosis": y})
    reason = "fewer than 5 cases"
    for path in ("/api/experiments/exp-roc/aggregate", "/api/experiments/exp-roc/aggregate.json"):
        report = client.get(path).json()
        east, north = report["groups"]["east"], report["groups"]["north"]
        assert east["cases"] == 3  # progress counts stay visible
        for key in ("sensitivity", "specificity", "auc", "positives", "true_positives",
                    "labelled"):
            assert east["figures"][key]["value"] is None, key
            assert east["figures"][key]["suppressed"] == reason
            assert east["figures"][key]["ci_low"] is None
        assert east["roc"] == {"positives": None, "negatives": None, "points": [],
                               "suppressed": reason}
        # east's AUC is withheld; so is north's (the only other spoke), or pooled minus
        # north would give east's back; the pooled AUC is shown.
        assert north["figures"]["auc"]["suppressed"].startswith("withheld so that")
        assert north["figures"]["auc"]["n"] is None and east["figures"]["auc"]["n"] is None
        assert report["groups"]["pooled"]["figures"]["auc"]["value"] is not None
        assert north["roc"]["points"]
        # pooled: 8 positives, 7 negatives -> shown
        assert report["groups"]["pooled"]["figures"]["specificity"]["value"] is not None
        assert report["min_cell_size"] == 5

    for response in (client.get("/api/experiments/exp-roc/aggregate.csv"),
                     client.get("/api/experiments/exp-roc/aggregate", params={"format": "csv"})):
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/csv")
        rows = csv_rows(response.text)
        east = figure_rows(rows, "east")
        for key in ("sensitivity", "specificity", "auc", "positives", "true_positives"):
            assert east[key]["value"] == "" and east[key]["suppressed"] == reason
            assert east[key]["ci_low"] == east[key]["ci_high"] == ""
        north = figure_rows(rows, "north")
        assert north["auc"]["value"] == north["auc"]["n"] == ""
        assert north["auc"]["suppressed"].startswith("withheld so that")
        pooled = figure_rows(rows, "pooled")
        assert pooled["auc"]["ci_method"] == "delong" and pooled["auc"]["suppressed"] == ""
        assert figure_rows(rows, "pooled")["cases"]["value"] == "16"  # with the queued n-fail
    roc = csv_rows(client.get("/api/experiments/exp-roc/roc.csv").text)
    assert [r for r in roc if r["group"] == "east"] == [
        {"group": "east", "threshold": "", "fpr": "", "tpr": "", "suppressed": reason}]
    north_points = report["groups"]["north"]["roc"]["points"]
    assert [(float(r["fpr"]), float(r["tpr"])) for r in roc if r["group"] == "north"] == [
        (p["fpr"], p["tpr"]) for p in north_points]
    assert north_points[0]["threshold"] is None and north_points[-1]["fpr"] == 1.0

    # k is a hub setting: with k = 2 the east spoke's sensitivity (2 positives) is shown.
    client.app.state.settings.min_cell_size = 2  # type: ignore[attr-defined]
    report = client.get("/api/experiments/exp-roc/aggregate").json()
    assert report["min_cell_size"] == 2
    assert report["groups"]["east"]["figures"]["sensitivity"]["value"] == 1.0
    assert report["groups"]["east"]["figures"]["specificity"]["suppressed"] == \
        "fewer than 2 cases"

    # Exports are for coordinators, and each is audited.
    session.expire_all()
    actions = [e.action for e in session.exec(select(AuditEvent).where(
        AuditEvent.target == "exp-roc"))]
    assert actions.count("aggregate.exported") == 4  # aggregate.json, .csv, ?format=csv, roc


def test_results_export_per_case(hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    spokes = run_study(session)
    send_result(session, spokes, "exp-roc", "north", "n0",
                {"prediction": {"p": 0.9, "model": "v2"}, "note": "=cmd|' /C calc'!A0",
                 "regions": [1, 2]}, {"diagnosis": 1})
    send_result(session, spokes, "exp-roc", "east", "e0", None, failed=True)
    rows = client.get("/api/experiments/exp-roc/results.json").json()
    by_case = {r["case_id"]: r for r in rows}
    assert len(rows) == len(NORTH) + 1 + len(EAST)  # every accepted case, finished or not
    assert by_case["n0"]["output"] == {"prediction.p": 0.9, "prediction.model": "v2",
                                       "note": "=cmd|' /C calc'!A0", "regions": [1, 2]}
    assert by_case["n0"]["released"] == {"diagnosis": 1}
    assert (by_case["n0"]["state"], by_case["n0"]["attempt"]) == ("succeeded", 1)
    assert (by_case["e0"]["state"], by_case["e0"]["failure_reason"]) == ("failed", "exit_code")
    assert by_case["n1"]["state"] == "queued"
    for text in (client.get("/api/experiments/exp-roc/results.csv").text,
                 client.get("/api/experiments/exp-roc/results", params={"format": "csv"}).text):
        table = {r["case_id"]: r for r in csv_rows(text)}
        assert table["n0"]["spoke_id"] == "north"
        assert table["n0"]["output.prediction.p"] == "0.9"
        assert table["n0"]["released.diagnosis"] == "1"
        assert table["n0"]["output.regions"] == "[1, 2]"
        assert table["n0"]["output.note"] == "'=cmd|' /C calc'!A0"  # never run as a formula
        assert table["e0"]["failure_reason"] == "exit_code"
    # a reviewer may not export results
    with Session(client.app.state.engine) as s:  # type: ignore[attr-defined]
        token, _ = issue_token(s, "rita", "a long enough password")  # type: ignore[misc]
    denied = client.get("/api/experiments/exp-roc/results.csv",
                        headers={"Authorization": f"Bearer {token}"})
    assert denied.status_code == 403
    assert client.get("/api/experiments/nope/results.json").status_code == 404


def test_experiment_creation_validates_aggregator_parameters(
        hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    Spokes(session, ["north"])
    add_experiment(session, "exp-x", ["north"], "summary", {})  # creates the algorithm
    body: dict[str, Any] = {"name": "roc study", "algorithm_id": 1, "spoke_ids": ["north"],
                            "aggregator": "binary-classification",
                            "aggregator_parameters": {"score": "p", "ci_method": "exactish"}}
    refused = client.post("/api/experiments", json=body)
    assert refused.status_code == 422 and "ci_method" in refused.json()["detail"]
    body["aggregator_parameters"] = {"score": "p", "label": "dx"}
    created = client.post("/api/experiments", json=body)
    assert created.status_code == 201, created.text
    parameters = created.json()["aggregator_parameters"]
    assert parameters["score"] == "p" and parameters["ci_method"] == "wilson"
    schema = client.get("/openapi.json").json()
    ok = schema["paths"]["/api/experiments/{experiment_id}/aggregate"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"]["$ref"].endswith("/AggregateRead")


def test_out_of_range_numbers_are_refused_as_bad_input(hub: tuple[TestClient, Session]
                                                       ) -> None:
    """Found by fuzzing the OpenAPI schema (schemathesis): numbers the database cannot hold
    are a 422 naming the parameter, never a server error."""
    client, _ = hub
    huge = 2**70
    for path in (f"/api/algorithms/{huge}", f"/api/algorithms/{huge}/reviews", "/api/audit?"
                 f"limit=-{huge}", "/api/audit?limit=0", "/api/quarantine?limit=-1"):
        response = client.get(path)
        assert response.status_code == 422, (path, response.text)
    revoke = client.post(f"/api/algorithms/{huge}/revoke", json={"reason": "x"})
    assert revoke.status_code == 422 and "algorithm_id" in revoke.text
    launch = client.post("/api/experiments", json={"name": "x", "algorithm_id": huge,
                                                   "spoke_ids": ["a"]})
    assert launch.status_code == 422 and "algorithm_id" in launch.text
    assert client.get("/api/algorithms/12345").status_code == 404  # in range, absent


def test_a_repository_with_an_impossible_port_is_refused(hub: tuple[TestClient, Session]
                                                         ) -> None:
    """Also found by schemathesis: a port past 65535 reached the registry client."""
    client, session = hub
    create_user(session, "dev", "a long enough password", [Role.DEVELOPER.value])
    token, _ = issue_token(session, "dev", "a long enough password")  # type: ignore[misc]
    for repository, message in (("registry:99999/algo", "not a TCP port"),
                                ("registry:54665351922557942739/algo", "must look like")):
        refused = client.post("/api/algorithms", headers={"Authorization": f"Bearer {token}"},
                              json={"name": "x", "version": "1", "repository": repository,
                                    "digest": "sha256:" + "0" * 64})
        assert refused.status_code == 422 and message in refused.text
