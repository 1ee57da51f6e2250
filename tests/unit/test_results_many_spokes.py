"""The results section of a study of many spokes: a compact summary (pooled figures, the
spoke table a page at a time and sortable, one forest plot of every spoke as an image of its
own URL), each spoke's plots on its own page, and a page that stays small."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert
from sqlmodel import Session

from tributary.hub import worker
from tributary.hub.main import create_app
from tributary.hub.models import (
    Algorithm,
    CaseResult,
    CaseState,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Role,
    Spoke,
    TargetState,
    utcnow,
)
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings
from tributary.hub.web.results import MANY_SPOKES, SPOKES_PER_PAGE

SPOKES = [f"site-{i:02d}" for i in range(SPOKES_PER_PAGE + 5)]
CASES = 4


def _fill(session: Session, experiment_id: str, spokes: list[str]) -> None:
    now = utcnow()
    session.add(Algorithm(id=1, name="alg", version="1", repository="r/alg",
                          digest="sha256:" + "0" * 64))
    for name in spokes:
        session.add(Spoke(id=name, name=name, last_seen_at=now))
    session.flush()
    session.add(Experiment(id=experiment_id, name="many", algorithm_id=1, aggregator="summary",
                           aggregator_parameters={}, state=ExperimentState.LAUNCHED,
                           launched_at=now))
    session.flush()
    rows = []
    for s, name in enumerate(spokes):
        session.add(ExperimentTarget(experiment_id=experiment_id, spoke_id=name,
                                     state=TargetState.ACCEPTED, case_count=CASES))
        for c in range(CASES):  # site-NN's score is about NN: sorting is checkable
            rows.append(dict(experiment_id=experiment_id, spoke_id=name, case_id=f"c{c}",
                             state=CaseState.SUCCEEDED, attempt=1, received_at=now,
                             finished_at=now, output={"score": s + c / 10}, released={}))
    session.commit()
    session.execute(insert(CaseResult), rows)
    session.commit()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[TestClient]:
    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-many",
                                         min_cell_size=2)
    with TestClient(create_app(settings)) as client, \
            Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        _fill(session, "exp-many", SPOKES)
        create_user(session, "carol", "a long enough password", [Role.COORDINATOR.value])
        token, _ = issue_token(session, "carol", "a long enough password")  # type: ignore[misc]
        client.headers["Authorization"] = f"Bearer {token}"
        yield client
    worker.configure(HubSettings())


def _groups(html: str) -> list[str]:
    marker = '<tr data-group="'
    table = html[html.index('id="aggregate"'):]
    table = table[:table.index("</table>")]
    return [part.split('"', 1)[0] for part in table.split(marker)[1:]]


def test_many_spokes_get_a_compact_paginated_sortable_summary(hub: TestClient) -> None:
    assert len(SPOKES) > MANY_SPOKES
    page = hub.get("/experiments/exp-many")
    assert page.status_code == 200
    assert 'id="pooled"' in page.text  # the pooled figures first
    assert f"Pooled over all {len(SPOKES)} spokes" in page.text
    assert _groups(page.text) == SPOKES[:SPOKES_PER_PAGE]
    assert 'id="spokes-next"' in page.text
    second = hub.get("/experiments/exp-many/results", params={"page": 2})
    assert _groups(second.text) == SPOKES[SPOKES_PER_PAGE:]
    by_mean = hub.get("/experiments/exp-many/results",
                      params={"sort": "score.mean", "desc": "true"})
    assert _groups(by_mean.text)[:3] == SPOKES[::-1][:3]
    # No per-spoke plot inline: one image of every spoke, drawn once per snapshot.
    assert "<svg" not in page.text.split('id="results"')[1]
    start = page.text.index('<img class="plot" src="') + len('<img class="plot" src="')
    url = page.text[start:page.text.index('"', start)].replace("&amp;", "&")
    image = hub.get(url)
    assert image.status_code == 200 and image.headers["content-type"].startswith("image/svg")
    assert "immutable" in image.headers["cache-control"]
    labels = " ".join(t.text or "" for t in ET.fromstring(image.text).iter(
        "{http://www.w3.org/2000/svg}text"))
    assert all(name in labels for name in SPOKES) and "pooled" in labels
    assert hub.get("/experiments/exp-many/plots/forest.svg",
                   params={"metric": "nope"}).status_code == 404


def test_each_spoke_has_its_own_page_of_plots(hub: TestClient) -> None:
    page = hub.get("/experiments/exp-many/spokes/site-03")
    assert page.status_code == 200
    assert "Distribution of score" in page.text and "<svg" in page.text
    assert '<tr data-group="site-03">' in page.text and '<tr data-group="pooled">' in page.text
    assert hub.get("/experiments/exp-many/spokes/elsewhere").status_code == 404


def test_the_experiments_list_shows_a_study_of_many_spokes_on_one_line(hub: TestClient) -> None:
    listing = hub.get("/")
    assert listing.status_code == 200
    assert f"{len(SPOKES)} spokes" in listing.text
    assert listing.text.count("<tr>") == 2  # the heading and the study's line
    assert f'aria-label="{len(SPOKES) * CASES} done, 0 failed, 0 running of ' \
           f'{len(SPOKES) * CASES}"' in listing.text
