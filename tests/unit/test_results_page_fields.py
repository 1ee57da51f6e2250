"""Output field names are data from algorithms (hostile by assumption): the experiment page
shows any of them, never reads one as a pattern."""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from signed_results import Spokes, accept, add_experiment, send_result
from sqlmodel import Session

from tributary.hub import worker
from tributary.hub.main import create_app
from tributary.hub.models import Role
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings

#: Names that break a regular-expression replacement template or pattern.
HOSTILE_FIELDS = ["score\\q", "\\1 group", "a(b", "\\g<0>", "x$y*"]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[TestClient, Session]]:
    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-fields",
                                         min_cell_size=2)
    with TestClient(create_app(settings)) as client, \
            Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        create_user(session, "carol", "a long enough password", [Role.COORDINATOR.value])
        token, _ = issue_token(session, "carol", "a long enough password")  # type: ignore[misc]
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, session
    worker.configure(HubSettings())


@pytest.mark.parametrize("field", HOSTILE_FIELDS)
def test_an_output_field_with_a_regex_escape_is_shown(hub: tuple[TestClient, Session],
                                                      field: str) -> None:
    client, session = hub
    spokes = Spokes(session, ["north"])
    add_experiment(session, "exp-fields", ["north"], "summary", {})
    accept(session, "exp-fields", "north", ["c0", "c1", "c2"])
    for i in range(3):
        assert send_result(session, spokes, "exp-fields", "north", f"c{i}", {field: i * 0.5})
    page = client.get("/experiments/exp-fields", params={"quantity": field})
    assert page.status_code == 200, page.text[:500]
    assert f"Distribution of {field}" in html.unescape(page.text)
    fragment = client.get("/experiments/exp-fields/results", params={"quantity": field})
    assert fragment.status_code == 200
