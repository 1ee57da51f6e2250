"""The case list at scale (issue 13): paginated with a stable cursor and filterable, on
the API and the experiment page; progress from counts; live streams that send deltas from
one computation per study. Per-case access rules: tests/unit/test_per_case_access.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from tributary.hub.api import events
from tributary.hub.main import create_app
from tributary.hub.models import (
    Algorithm,
    CaseAttempt,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Spoke,
    TargetState,
    utcnow,
)
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings

EXPERIMENT = "exp-pages"
SPOKES = ["east", "north", "west"]
CASES = 7
PASSWORD = "a long enough password"


def _state(n: int) -> CaseState:
    return CaseState.FAILED if n % 5 == 0 else CaseState.SUCCEEDED


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-pages")
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        with Session(engine) as session:
            tokens = {}
            for role in ("coordinator", "reviewer"):
                create_user(session, role, PASSWORD, [role])  # type: ignore[list-item]
                tokens[role] = issue_token(session, role, PASSWORD)[0]  # type: ignore[index]
            session.add(Algorithm(id=1, name="a", version="1", repository="r/a",
                                  digest="sha256:" + "0" * 64))
            for spoke in SPOKES:
                session.add(Spoke(id=spoke, name=spoke, last_seen_at=utcnow()))
            session.flush()
            session.add(Experiment(id=EXPERIMENT, name="pages", algorithm_id=1,
                                   state=ExperimentState.LAUNCHED, aggregator="summary",
                                   aggregator_parameters={}))
            session.flush()
            for s, spoke in enumerate(SPOKES):
                session.add(ExperimentTarget(experiment_id=EXPERIMENT, spoke_id=spoke,
                                             state=TargetState.ACCEPTED, case_count=CASES))
                for c in range(CASES):
                    n = s * CASES + c
                    failed = _state(n) == CaseState.FAILED
                    session.add(CaseResult(
                        experiment_id=EXPERIMENT, spoke_id=spoke, case_id=f"c{c:02d}",
                        state=_state(n), output=None if failed else {"score": n / 100},
                        failure={"reason": "timeout" if n % 2 else "exit",
                                 "detail": "x"} if failed else None,
                        result_message_id=f"m{n}"))
                    session.add(CaseAttempt(
                        experiment_id=EXPERIMENT, spoke_id=spoke, case_id=f"c{c:02d}",
                        attempt=1, state=_state(n), result_message_id=f"m{n}",
                        custody_sha256=f"{n:064d}"))
            session.commit()
        yield client, tokens


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _all_pages(client: TestClient, token: str, url: str) -> tuple[list[dict], int]:
    seen: list[dict] = []
    pages = 0
    while url:
        response = client.get(url, headers=_auth(token))
        assert response.status_code == 200, response.text
        seen += response.json()
        pages += 1
        url = response.links.get("next", {}).get("url", "")
        assert bool(url) == ("X-Next-Cursor" in response.headers)
    return seen, pages


def test_pages_walk_every_case_once_in_a_stable_order(hub) -> None:  # type: ignore[no-untyped-def]
    client, tokens = hub
    seen, pages = _all_pages(client, tokens["coordinator"],
                             f"/api/experiments/{EXPERIMENT}/cases?limit=4")
    keys = [(c["spoke_id"], c["case_id"]) for c in seen]
    assert keys == sorted(keys) and len(set(keys)) == len(SPOKES) * CASES
    assert pages == -(-len(SPOKES) * CASES // 4)
    assert all(len(c["attempts"]) == 1 for c in seen)
    # The default page is bounded, and a page larger than the maximum is refused.
    one = client.get(f"/api/experiments/{EXPERIMENT}/cases?limit=1",
                     headers=_auth(tokens["coordinator"]))
    assert len(one.json()) == 1 and 'rel="next"' in one.headers["Link"]
    too_big = client.get(f"/api/experiments/{EXPERIMENT}/cases?limit=5000",
                         headers=_auth(tokens["coordinator"]))
    assert too_big.status_code == 422


def test_filters_by_spoke_state_and_failure_reason(hub) -> None:  # type: ignore[no-untyped-def]
    client, tokens = hub
    token = tokens["coordinator"]
    base = f"/api/experiments/{EXPERIMENT}/cases?limit=2"
    north, _ = _all_pages(client, token, f"{base}&spoke=north")
    assert {c["spoke_id"] for c in north} == {"north"} and len(north) == CASES
    failed, _ = _all_pages(client, token, f"{base}&state=failed")
    expected = sum(_state(n) == CaseState.FAILED for n in range(len(SPOKES) * CASES))
    assert len(failed) == expected and {c["state"] for c in failed} == {"failed"}
    timeouts, _ = _all_pages(client, token, f"{base}&failure_reason=timeout")
    assert timeouts and {c["failure"]["reason"] for c in timeouts} == {"timeout"}
    assert len(timeouts) < len(failed)
    bad = client.get(f"{base}&cursor=not-a-cursor", headers=_auth(token))
    assert bad.status_code == 422 and "cursor" in bad.json()["detail"]
    assert client.get(f"{base}&state=exploded", headers=_auth(token)).status_code == 422


def test_the_case_list_stays_closed_to_who_may_not_see_cases(hub) -> None:  # type: ignore[no-untyped-def]
    client, tokens = hub
    response = client.get(f"/api/experiments/{EXPERIMENT}/cases?limit=2&state=failed",
                          headers=_auth(tokens["reviewer"]))
    assert response.status_code == 403


def test_the_experiment_page_shows_one_page_of_cases_and_counts(hub) -> None:  # type: ignore[no-untyped-def]
    client, tokens = hub
    client.cookies.clear()
    page = client.get(f"/experiments/{EXPERIMENT}?state=failed",
                      headers=_auth(tokens["coordinator"])).text
    body = page[page.index('id="cases"'):]
    assert body.count("<tr>") == sum(_state(n) == CaseState.FAILED
                                     for n in range(len(SPOKES) * CASES))
    assert "badge ok" not in body.split("</tbody>")[0]
    experiment = client.get(f"/api/experiments/{EXPERIMENT}",
                            headers=_auth(tokens["coordinator"])).json()
    east = next(t for t in experiment["targets"] if t["spoke_id"] == "east")
    assert east["failed"] == sum(_state(n) == CaseState.FAILED for n in range(CASES))
    assert east["succeeded"] + east["failed"] == CASES


def test_live_stream_first_event_whole_then_deltas() -> None:
    old = {"experiment": {"state": "launched", "targets": [
        {"spoke_id": "a", "succeeded": 1}, {"spoke_id": "b", "succeeded": 0}]}, "snapshot": 1}
    new = json.loads(json.dumps(old))
    new["experiment"]["targets"][1]["succeeded"] = 1
    new["snapshot"] = 2
    change = events.delta(old, new)
    assert change == {"experiment": {"state": "launched",
                                     "targets": [{"spoke_id": "b", "succeeded": 1}]},
                      "snapshot": 2, "delta": True}
    assert events.delta(new, new) is None


def test_viewers_of_a_study_share_one_computation(hub) -> None:  # type: ignore[no-untyped-def]
    client, tokens = hub
    url = f"/api/experiments/{EXPERIMENT}/events"
    firsts = []
    for _ in range(3):
        with client.stream("GET", url, headers=_auth(tokens["coordinator"])) as response:
            data = next(line for line in response.iter_lines() if line.startswith("data:"))
            firsts.append(json.loads(data[5:]))
    first = firsts[0]
    assert len(first["experiment"]["targets"]) == len(SPOKES)
    assert len(first["cases"]) == len(SPOKES) * CASES and "snapshot" in first
    feeds = client.app.state.event_feeds  # type: ignore[attr-defined]
    assert set(feeds) <= {f"experiment:{EXPERIMENT}"}


def test_fifty_viewers_cost_one_poll_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "POLL_SECONDS", 0.05)
    calls = [0]

    def compute() -> dict[str, int]:
        calls[0] += 1
        return {"n": calls[0]}

    async def watch() -> list[int]:
        feeds: dict[str, events.Feed] = {}
        feed = events.Feed("k", compute, feeds)
        feeds["k"] = feed
        queues = [(await feed.subscribe())[0] for _ in range(50)]
        await asyncio.sleep(0.5)
        got = [q.qsize() for q in queues]
        for q in queues:
            feed.unsubscribe(q)
        await asyncio.sleep(0.15)
        assert "k" not in feeds  # the last viewer gone, the feed stops polling
        return got

    got = asyncio.run(watch())
    # One read per viewer as it connects, then one per interval, not one per viewer.
    assert 50 + 3 <= calls[0] <= 50 + 15, calls
    assert all(n >= 1 for n in got)
