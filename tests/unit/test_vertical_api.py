"""The hub's vertical studies on a real database through its API and dashboard: creation
(spokes checked, audited), the study's state as the spokes' signed statuses and answers
move it (a wrong answer refused, a duplicate ignored), its losses, the model as the
coordinator sees it (nothing unless released), the dashboard page with its loss plot and
the signed bundle with the study's audit events."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from signed_results import Spokes
from sqlmodel import Session

from tributary.hub import worker
from tributary.hub.main import create_app
from tributary.hub.models import Role, VerticalStudy
from tributary.hub.services import vertical
from tributary.hub.services.users import create_user, issue_token
from tributary.hub.settings import HubSettings
from tributary.protocol.bundle import MANIFEST, MANIFEST_PAYLOAD_TYPE, MANIFEST_SIGNATURE
from tributary.protocol.cohorts import vertical as vmsg
from tributary.protocol.signing import verify
from tributary.protocol.training.rounds import ObjectRef

BODY = {"name": "nodules", "psi_id": "psi-1", "features_spoke": "imaging",
        "label_spoke": "clinic", "features_attributes": ["volume", "mean_hu"],
        "label_attributes": ["age"], "label": "diagnosis", "positive": "malignant",
        "rounds": 2, "key_bits": 2048}


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[TestClient, Session]]:
    settings = HubSettings.for_directory(tmp_path, signing_key=tmp_path / "hub.key",
                                         consume_results=False, broker_federation="t-vertical",
                                         run_training=False)
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        with Session(engine) as session:
            create_user(session, "carol", "a long enough password", [Role.COORDINATOR.value])
            token, _ = issue_token(session, "carol", "a long enough password")  # type: ignore[misc]
            client.headers["Authorization"] = f"Bearer {token}"
            Spokes(session, ["imaging", "clinic"])
            yield client, session
    worker.configure(HubSettings())


def accept(session: Session, study_id: str) -> VerticalStudy:
    study = session.get(VerticalStudy, study_id)
    assert study is not None
    for spoke, n, features in (("imaging", "ab12", 2), ("clinic", "cd34", 2)):
        vertical.apply_status(session, study, spoke, vmsg.Status(
            study_id=study_id, state="accepted", public_key=vmsg.PublicKey(n=n), rows=50,
            features=features))
    session.commit()
    return study


def ref(spoke: str, name: str) -> ObjectRef:
    return ObjectRef(digest="sha256:" + "0" * 64, location=f"spokes/{spoke}/000000000/{name}",
                     size=10)


def test_create_read_and_refusals(hub: tuple[TestClient, Session]) -> None:
    client, session = hub
    unknown = client.post("/api/vertical-studies", json={**BODY, "label_spoke": "nowhere"})
    assert unknown.status_code == 422 and "nowhere" in unknown.text
    same = client.post("/api/vertical-studies", json={**BODY, "label_spoke": "imaging"})
    assert same.status_code == 422
    label_as_feature = client.post("/api/vertical-studies",
                                   json={**BODY, "label_attributes": ["diagnosis"]})
    assert label_as_feature.status_code == 422 and "label" in label_as_feature.text
    created = client.post("/api/vertical-studies", json=BODY)
    assert created.status_code == 201, created.text
    study_id = created.json()["id"]
    assert created.json()["state"] == "inviting"
    assert [s["id"] for s in client.get("/api/vertical-studies").json()] == [study_id]

    study = accept(session, study_id)
    assert study.state == "running" and study.stage == "share"
    # A wrong answer (another stage) is refused; the study does not move.
    with pytest.raises(vertical.VerticalError, match="study is at round 0 share"):
        vertical.apply_reply(session, study, "imaging", vmsg.Reply(
            study_id=study_id, round_index=0, stage="cross", object=ref("imaging", "x")))
    # An object in the other spoke's area is refused.
    with pytest.raises(vertical.VerticalError, match="outside its own area"):
        vertical.apply_reply(session, study, "imaging", vmsg.Reply(
            study_id=study_id, round_index=0, stage="share", object=ref("clinic", "x")))
    for spoke in ("imaging", "clinic"):
        answer = vmsg.Reply(study_id=study_id, round_index=0, stage="share",
                            object=ref(spoke, "s"))
        assert vertical.apply_reply(session, study, spoke, answer)
        assert not vertical.apply_reply(session, study, spoke, answer)  # duplicate
    assert vertical.stage_complete(study)
    vertical.advance(session, study, {s: ref(s, "copy") for s in ("imaging", "clinic")})
    session.commit()
    steps = vertical.pending_messages(study)
    assert {m.spoke_id: m.peer_key.n for m in steps} == {  # type: ignore[union-attr]
        "imaging": "cd34", "clinic": "ab12"}
    # The loss only from the label spoke.
    vertical.advance(session, study, {s: ref(s, "c") for s in ("imaging", "clinic")})
    with pytest.raises(vertical.VerticalError, match="only the label spoke"):
        vertical.apply_reply(session, study, "imaging", vmsg.Reply(
            study_id=study_id, round_index=0, stage="decrypt", values=["1", "2"], loss=0.6))
    vertical.apply_reply(session, study, "imaging", vmsg.Reply(
        study_id=study_id, round_index=0, stage="decrypt", values=["1", "2"]))
    vertical.apply_reply(session, study, "clinic", vmsg.Reply(
        study_id=study_id, round_index=0, stage="decrypt", values=["3", "4"], loss=0.69))
    vertical.advance(session, study)
    session.commit()
    assert {m.spoke_id: m.values for m in vertical.pending_messages(study)} == {  # type: ignore[union-attr]
        "imaging": ["3", "4"], "clinic": ["1", "2"]}
    assert client.get(f"/api/vertical-studies/{study_id}/losses").json() == [0.69]
    model = client.get(f"/api/vertical-studies/{study_id}/model").json()
    assert model == {"released": False, "state": "running",
                     "parties": {"imaging": None, "clinic": None}, "intercept": None}
    # Coefficients the study did not ask for are refused.
    with pytest.raises(vertical.VerticalError, match="did not ask for"):
        vertical.apply_final(session, study, "imaging", vmsg.Final(
            study_id=study_id, coefficients=[vmsg.Coefficient(name="volume", value=1.0)],
            intercept=0.0))

    page = client.get("/vertical")
    assert page.status_code == 200 and "nodules" in page.text and "<svg" in page.text

    bundle = client.get(f"/api/vertical-studies/{study_id}/bundle")
    assert bundle.status_code == 200
    archive = zipfile.ZipFile(io.BytesIO(bundle.content))
    record = json.loads(archive.read("vertical-study.json"))
    assert record["losses"] == [0.69] and "answers" not in record
    actions = [e["action"] for e in json.loads(archive.read("audit-events.json"))]
    assert actions[0] == "vertical.created" and "vertical.answered" in actions
    hub_key = client.app.state.signing_key.public  # type: ignore[attr-defined]
    manifest = archive.read(MANIFEST)
    assert verify(json.loads(archive.read(MANIFEST_SIGNATURE)), [hub_key],
                  MANIFEST_PAYLOAD_TYPE) == manifest
