"""The hub keeps a spoke's catalog description only when the spoke is registered, not
revoked and enrolled, and its own key signed this very description; a redelivery or an
older description overtaken on the way changes nothing; the facets judge spokes only by
what they published."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from tributary.hub.db import make_engine
from tributary.hub.models import AuditEvent, Spoke, SpokeCatalogEntry, SpokeKey
from tributary.hub.services.catalog import Facets, catalog_read
from tributary.hub.services.ingest import ingest
from tributary.protocol.cohorts.catalog import (
    CountCell,
    ReleaseTerms,
    SpokeDescription,
    sign_description,
)
from tributary.protocol.messages import ProtocolError, decode_from_spoke
from tributary.protocol.signing import SigningKey

TERMS = ReleaseTerms(min_cell=5, counts_enabled=True, steward_approves_experiments=False,
                     steward_reviews_results=False, log_tails=True, max_output_bytes=1024,
                     training=False)
KEY = SigningKey.generate()


def description(spoke: str = "north", cases: int = 30, at: datetime | None = None,
                **extra: object) -> SpokeDescription:
    cells = [CountCell(modality="CT", cases=cases),
             CountCell(modality="CT", body_part="CHEST", cases=cases)]
    return SpokeDescription(spoke_id=spoke, generated_at=at or datetime.now(UTC),
                            terms=TERMS, cases=cases, cells=cells, **extra)


@pytest.fixture
def session(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    with Session(engine) as s:
        for spoke in ("north", "river"):
            s.add(Spoke(id=spoke, name=spoke, institution=f"{spoke} Hospital"))
        s.add(Spoke(id="bare", name="bare"))
        s.flush()
        s.add(SpokeKey(keyid=KEY.keyid, spoke_id="north", public_key_pem=KEY.public.pem))
        s.commit()
        yield s


def test_kept_once_audited_and_a_stale_one_ignored(session: Session) -> None:
    now = datetime.now(UTC)
    message = sign_description(description(at=now), KEY)
    assert ingest(session, message)
    assert not ingest(session, message)  # the same message again: a duplicate
    older = sign_description(description(cases=20, at=now - timedelta(hours=1)), KEY)
    assert not ingest(session, older)
    entry = session.get(SpokeCatalogEntry, "north")
    assert entry is not None and entry.description["cases"] == 30
    assert entry.envelope == message.envelope
    events = session.exec(select(AuditEvent).where(
        AuditEvent.action == "catalog.received")).all()
    assert [e.detail["stale"] for e in events] == [False, True]


@pytest.mark.parametrize("case", ["unregistered", "no key", "wrong key", "revoked"])
def test_refused_before_anything_changes(session: Session, case: str) -> None:
    spoke = {"unregistered": "ghost", "no key": "bare"}.get(case, "north")
    key = SigningKey.generate() if case == "wrong key" else KEY
    if case == "revoked":
        row = session.get(Spoke, "north")
        assert row is not None
        row.revoked_at = datetime.now(UTC)
        session.add(row)
        session.commit()
    with pytest.raises(ProtocolError):
        ingest(session, sign_description(description(spoke=spoke), key))
    assert session.exec(select(SpokeCatalogEntry)).all() == []


def test_facets_and_estimate(session: Session) -> None:
    ingest(session, sign_description(description(cases=30, attributes=["nodules"]), KEY))
    other = SigningKey.generate()
    session.add(SpokeKey(keyid=other.keyid, spoke_id="river", public_key_pem=other.public.pem))
    session.commit()
    small = SpokeDescription(spoke_id="river", generated_at=datetime.now(UTC), terms=TERMS)
    ingest(session, sign_description(small, other))
    view = catalog_read(session, Facets.parse("ct", None, [], None))
    assert view.matching == ["north"] and view.estimate == 30 and view.possible_more == 4
    assert {s.spoke_id: s.match for s in view.spokes} == {"north": "yes", "river": "possible"}
    view = catalog_read(session, Facets.parse("CT", "knee", [], None))
    assert view.matching == [] and view.spokes[0].cases_at_most == 30
    assert catalog_read(session, Facets.parse(None, None, ["nodules"], 31)).matching == []
    assert catalog_read(session, Facets.parse(None, None, ["nodules"], 30)).matching == [
        "north"]
    with pytest.raises(ValueError):
        Facets.parse("<script>", None, [], None)


@pytest.mark.parametrize("envelope", [
    {}, {"payload": 5, "payloadType": "x", "signatures": "nope"},
    {"payload": "!!", "payloadType": "application/vnd.tributary.catalog-description+json",
     "signatures": [{"keyid": KEY.keyid, "sig": "AAAA"}]},
    {"payload": [], "payloadType": None, "signatures": [None]},
    {"payload": "e30=", "payloadType": "application/vnd.tributary.catalog-description+json",
     "signatures": [{"keyid": 7, "sig": {"a": 1}}]},
])
def test_a_hostile_envelope_is_refused_cleanly(session: Session, envelope: dict) -> None:
    """Refused as a malformed message when the broker's bytes are decoded, or by the
    signature check: never an exception of another kind."""
    body = sign_description(description(), KEY).model_dump(mode="json")
    try:
        message = decode_from_spoke(json.dumps({**body, "envelope": envelope}))
    except ProtocolError:
        return
    with pytest.raises(ProtocolError):
        ingest(session, message)
    assert session.exec(select(SpokeCatalogEntry)).all() == []
