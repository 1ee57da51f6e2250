"""The dashboard's training pages and the training study's API on a hub whose database
holds the rows of real rounds (three spoke participants and the hub's state machine, as in
test_training_rounds): the list, the study page with its rounds, dropouts and curves, the
live stream, the provenance signed by the hub, the bundle, and who may download what."""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from signed_results import Spokes
from sqlmodel import Session, select
from unit.test_training_rounds import Federation

from tributary.hub.main import create_app
from tributary.hub.models import Algorithm, Spoke, utcnow
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings
from tributary.protocol.bundle import verify_bundle
from tributary.protocol.signing import PublicKey
from tributary.protocol.training.provenance import open_provenance, problems

PASSWORD = "a long enough password"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[TestClient, Federation, dict[str, str]]]:
    fed = Federation(tmp_path, rounds=3, z=0.8, budget=1e6)
    assert fed.run_round(0).stage == "aggregated"
    fed.dropped_after_masking = {"spoke-c"}
    assert fed.run_round(1).stage == "aggregated"
    fed.dropped_after_masking = set()
    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-train")
    with TestClient(create_app(settings)) as client:
        with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
            tokens = {}
            for role in ("coordinator", "reviewer"):
                create_user(session, role, PASSWORD, [role])  # type: ignore[list-item]
                tokens[role] = issue_token(session, role, PASSWORD)[0]  # type: ignore[index]
            session.commit()
        yield client, fed, tokens


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _first_event(client: TestClient, url: str, token: str) -> dict[str, Any]:
    with client.stream("GET", url, headers=_auth(token)) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                return json.loads(line[6:])  # type: ignore[no-any-return]
    raise AssertionError("no event")


def test_list_and_study_page_show_rounds_dropouts_and_curves(hub) -> None:  # type: ignore[no-untyped-def]
    client, fed, tokens = hub
    page = client.get("/training", headers=_auth(tokens["reviewer"]))
    assert page.status_code == 200 and fed.study_id in page.text
    assert 'href="/training"' in page.text  # in the nav
    page = client.get(f"/training/{fed.study_id}", headers=_auth(tokens["reviewer"]))
    assert page.status_code == 200
    html = page.text
    assert f'data-live="/api/training-studies/{fed.study_id}/events"' in html  # running
    assert html.count('<tr data-round="') == 2
    assert "dropped after masking (update recovered): spoke-c" in html
    assert 'aria-label="Training per round' in html and "cumulative epsilon" in html
    assert "/api/training-studies/" in html and "Provenance" in html
    assert "Download latest model" not in html  # a reviewer: no model download
    page = client.get(f"/training/{fed.study_id}", headers=_auth(tokens["coordinator"]))
    assert "Download latest model" in page.text
    assert client.get("/training/ts-nope", headers=_auth(tokens["reviewer"])).status_code == 404

    event = _first_event(client, f"/api/training-studies/{fed.study_id}/events",
                         tokens["reviewer"])
    assert event["study"]["state"] == "running" and len(event["rounds"]) == 2
    assert event["rounds"][1]["dropped_after_masking"] == ["spoke-c"]

    assert fed.run_round(2).stage == "aggregated"
    assert fed.run_round(3) is None  # the study finishes
    html = client.get(f"/training/{fed.study_id}", headers=_auth(tokens["coordinator"])).text
    assert "data-live=" not in html and "3 rounds done" in html
    assert "Download final model" in html
    fragment = client.get(f"/training/{fed.study_id}/summary",
                          headers=_auth(tokens["coordinator"]))
    assert fragment.status_code == 200 and "3 of 3 aggregated" in fragment.text


def test_provenance_bundle_and_model_access(hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, fed, tokens = hub
    hub_key = PublicKey.from_pem(client.get("/api/hub/key").text)
    answer = client.get(f"/api/training-studies/{fed.study_id}/provenance",
                        headers=_auth(tokens["reviewer"]))
    assert answer.status_code == 200
    prov = open_provenance(answer.json()["envelope"], hub_key)
    assert prov.model_dump(mode="json") == answer.json()["provenance"]
    assert problems(prov, hub_key) == [] and len(prov.models) == 3

    model = client.get(f"/api/training-studies/{fed.study_id}/model",
                       headers=_auth(tokens["reviewer"]))
    assert model.status_code == 403  # coordinators only
    model = client.get(f"/api/training-studies/{fed.study_id}/model",
                       headers=_auth(tokens["coordinator"]))
    assert model.status_code == 503 and "object store" in model.text  # none configured here
    assert client.get(f"/api/training-studies/{fed.study_id}/model?index=9",
                      headers=_auth(tokens["coordinator"])).status_code == 404

    bundle = client.get(f"/api/training-studies/{fed.study_id}/bundle",
                        headers=_auth(tokens["coordinator"]))
    assert bundle.status_code == 200
    folder, keys = tmp_path / "bundle", tmp_path / "keys"
    zipfile.ZipFile(io.BytesIO(bundle.content)).extractall(folder)
    keys.mkdir()
    (keys / "hub.pub").write_text(hub_key.pem)
    report = verify_bundle(folder, keys)
    assert report.ok and report.training_rounds == 2, report.problems
    assert client.get(f"/api/training-studies/{fed.study_id}/bundle",
                      headers=_auth(tokens["reviewer"])).status_code == 403
    assert client.get("/api/training-studies/ts-nope/provenance",
                      headers=_auth(tokens["reviewer"])).status_code == 404


def test_the_launch_form_offers_usable_spokes_and_approved_images(hub) -> None:  # type: ignore[no-untyped-def]
    client, _, tokens = hub
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        Spokes(session, ["north", "south"])
        session.add(Spoke(id="keyless", name="keyless"))
        session.add(Spoke(id="sandbox-1", name="sandbox", sandbox=True))
        # Only the state matters to the form: a recorded approval (its envelope is checked
        # where it is made, tests/e2e/test_approval_e2e.py), none, or a revocation.
        for n, (approval, revoked) in enumerate(((True, False), (False, False), (True, True))):
            session.add(Algorithm(
                name=f"train-{n}", version="1", repository=f"registry.test/train-{n}",
                digest="sha256:" + f"{n}" * 64, approval={"payload": "…"} if approval else None,
                revoked_at=utcnow() if revoked else None))
        session.commit()
    listed = client.get("/training", headers=_auth(tokens["coordinator"])).text
    assert 'href="/training/new"' in listed
    assert 'href="/training/new"' not in client.get(
        "/training", headers=_auth(tokens["reviewer"])).text
    page = client.get("/training/new", headers=_auth(tokens["coordinator"]))
    assert page.status_code == 200 and 'id="new-training"' in page.text
    boxes = dict(re.findall(r'<input type="checkbox" name="spokes" value="([^"]+)" ?(\w*)>',
                            page.text))
    assert boxes == {"north": "", "south": "", "keyless": "disabled", "sandbox-1": "disabled"}
    assert "Only coordinators" not in page.text
    assert "Only coordinators" in client.get("/training/new",
                                             headers=_auth(tokens["reviewer"])).text
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        ids = {a.name: a.id for a in session.exec(select(Algorithm))}
    offered = dict(re.findall(r'<option value="(\d+)">([^<]+)</option>', page.text))
    # the approved, unrevoked versions only (the fixture's own approved one among them)
    assert offered[str(ids["train-0"])] == "train-0 1 · registry.test/train-0@sha256:" + "0" * 64
    assert str(ids["train-1"]) not in offered and str(ids["train-2"]) not in offered
    assert set(offered) == {str(a_id) for name, a_id in ids.items()
                            if name not in ("train-1", "train-2")}
    for strategy in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"):
        assert f'<option value="{strategy}">' in page.text
