"""Who may see per-case data (issue 10, item 13): one rule, checked on every route. The
test walks every GET route of the hub's OpenAPI schema, the dashboard's pages and the SSE
streams, as every role and anonymously, on an experiment whose cases carry a recognisable
output and released attribute, and compares what each response shows with an explicit
table of who may see what."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from signed_results import Spokes, accept, add_experiment, send_result
from sqlmodel import Session

from tributary.hub import worker
from tributary.hub.main import create_app
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings
from tributary.hub.web.pages import router as pages_router

EXPERIMENT = "exp-walk"
OUTPUT_MARKER = "PERCASE-OUTPUT-4f1c"
RELEASED_MARKER = "PERCASE-RELEASED-9b2e"
PASSWORD = "a long enough password"

#: Roles that may see per-case outputs and released attributes (admins may do anything).
CASE_READERS = {"admin", "coordinator"}
#: Every route that shows per-case data to a case reader. Any other route shows it to nobody.
PER_CASE_ROUTES = {
    "/api/experiments/{experiment_id}/cases",
    "/api/experiments/{experiment_id}/events",
    "/api/experiments/{experiment_id}/results",
    "/api/experiments/{experiment_id}/results.json",
    "/api/experiments/{experiment_id}/results.csv",
    "/experiments/{experiment_id}",
}
ROLES = [None, "admin", "coordinator", "developer", "reviewer"]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-walk",
                                         min_cell_size=5)
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        tokens: dict[str, str] = {}
        with Session(engine) as session:
            for role in ROLES[1:]:
                create_user(session, f"user-{role}", PASSWORD, [role])  # type: ignore[list-item]
                token, _ = issue_token(session, f"user-{role}", PASSWORD)  # type: ignore[misc]
                tokens[role] = token  # type: ignore[index]
            spokes = Spokes(session, ["north"])
            add_experiment(session, EXPERIMENT, ["north"], "summary", {})
            cases = [f"c-walk-{i}" for i in range(6)]
            accept(session, EXPERIMENT, "north", cases)
            for i, case in enumerate(cases):
                send_result(session, spokes, EXPERIMENT, "north", case,
                            {"score": i / 10, "finding": OUTPUT_MARKER},
                            {"diagnosis": RELEASED_MARKER})
        yield client, tokens
    worker.configure(HubSettings())


def _get(client: TestClient, path: str, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if path.endswith("/events"):  # SSE: read up to the first progress event
        with client.stream("GET", path, headers=headers) as response:
            if response.status_code != 200:
                return response.status_code, response.read().decode()
            seen = []
            for line in response.iter_lines():
                seen.append(line)
                if line.startswith("data:"):
                    break
            return 200, "\n".join(seen)
    response = client.get(path, headers=headers, follow_redirects=False)
    return response.status_code, response.text


def _routes(client: TestClient) -> list[str]:
    """Every GET route: the OpenAPI schema's, and the dashboard pages outside it."""
    schema = client.get("/openapi.json").json()
    paths = [p for p, ops in schema["paths"].items() if "get" in ops]
    pages = [r.path for r in pages_router.routes  # included without a prefix
             if isinstance(r, APIRoute) and "GET" in r.methods]
    return list(dict.fromkeys(paths + pages))


def test_per_case_data_reaches_exactly_the_roles_the_table_names(
        hub: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = hub
    routes = _routes(client)
    assert set(routes) >= PER_CASE_ROUTES, PER_CASE_ROUTES - set(routes)
    wrong: list[str] = []
    for route in routes:
        path = route.replace("{experiment_id}", EXPERIMENT)
        path = re.sub(r"\{[^}]+\}", "1", path)
        for role in ROLES:
            status, body = _get(client, path, tokens.get(role) if role else None)
            if status >= 500:
                wrong.append(f"{role or 'anonymous'} GET {route} -> {status}")
            shown = OUTPUT_MARKER in body or RELEASED_MARKER in body
            allowed = route in PER_CASE_ROUTES and role in CASE_READERS
            if shown != allowed:
                wrong.append(f"{role or 'anonymous'} GET {route} -> {status}: per-case data "
                             f"{'shown' if shown else 'not shown'}")
    assert not wrong, "\n".join(wrong)


def test_a_reviewer_sees_the_aggregate_but_no_case_on_the_experiment_page(
        hub: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = hub
    status, page = _get(client, f"/experiments/{EXPERIMENT}", tokens["reviewer"])
    assert status == 200 and 'id="aggregate"' in page
    assert "coordinators only" in page and "c-walk-0" not in page
    status, events = _get(client, f"/api/experiments/{EXPERIMENT}/events", tokens["reviewer"])
    assert status == 200 and '"cases":[]' in events and '"experiment"' in events


def test_the_case_page_is_for_case_readers_only(hub: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = hub
    path = f"/experiments/{EXPERIMENT}/cases/north/c-walk-0"
    for role in ROLES:
        status, body = _get(client, path, tokens.get(role) if role else None)
        shown = OUTPUT_MARKER in body
        assert shown == (role in CASE_READERS), (role, status)
    assert _get(client, f"/experiments/{EXPERIMENT}/cases/north/c-nope", tokens["admin"]
                )[0] == 404
