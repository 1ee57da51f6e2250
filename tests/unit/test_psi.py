"""Private set intersection without the broker: real spoke journals, real cryptography and
the hub's real ingest and relay checks on a real database, with the broker's part (carry
the sealed bytes) done by the test. Shows what the e2e test cannot cheaply: redelivered
and restarted steps happen exactly once, hostile relays fail the PSI without stopping the
spoke, the hub relays nothing out of protocol, and the agreed identifier may never be a
releasable attribute."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from tributary.hub.db import make_engine
from tributary.hub.models import PsiRelayRecord, PsiRun, Spoke, SpokeKey
from tributary.hub.services import psi as hub_psi
from tributary.hub.services.ingest import ingest_batch
from tributary.protocol.auditlog import AuditLog
from tributary.protocol.cohorts.psi import PsiForward, PsiRelay, PsiStep
from tributary.protocol.messages import ProtocolError
from tributary.protocol.signing import PublicKey, SigningKey
from tributary.protocol.wire import open_from_spoke
from tributary.spoke import psi_crypto
from tributary.spoke.config import SpokeConfig
from tributary.spoke.custody import outgoing
from tributary.spoke.journal import Journal
from tributary.spoke.linkage import Linkage
from tributary.spoke.psi_party import PsiParty
from tributary.spoke.psi_store import PsiDesk

HOLDINGS = {"site-a": range(0, 30), "site-b": range(10, 40), "site-c": range(15, 50)}


def _config(root: Path, spoke: str, **cohorts: Any) -> SpokeConfig:
    data = root / spoke / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [f"MRN-{spoke}-{i},C-{i:05d}" for i in HOLDINGS.get(spoke, range(3))]
    (data / "attributes.csv").write_text("patient_id,consortium_id\n" + "\n".join(rows) + "\n")
    return SpokeConfig.model_validate({
        "spoke_id": spoke, "data_dir": str(data), "work_dir": str(root / spoke / "work"),
        "hub_public_key": str(root / "hub.pub"),
        "policy": {"attributes_file": str(data / "attributes.csv")},
        "counts": {"min_cell": 5},
        "cohorts": {"link_identifier": "consortium_id", "approve_psi": False, **cohorts}})


class Site:
    """One spoke's PSI side on its own journal, as the agent wires it."""

    def __init__(self, config: SpokeConfig, key: SigningKey) -> None:
        self.config, self.key = config, key
        self.open()

    def open(self) -> None:
        self.journal = Journal(self.config.work_dir / "journal.db")
        log = AuditLog(self.config.work_dir / "audit.jsonl")
        spoke = self.config.spoke_id

        def audit(action: str, target: str = "", actor: str | None = None,
                  **detail: Any) -> None:
            log.append(actor or spoke, action, target, detail)

        self.party = PsiParty(self.config, self.journal, self.key,
                              lambda m: outgoing(m, self.key), audit, lambda: None)

    def restart(self) -> None:
        self.journal.close()
        self.open()

    def outbox(self) -> list[Any]:
        rows = self.journal.outbox_pending(1000)
        for row in rows:
            self.journal.mark_sent(row.seq)
        return rows


class Federation:
    def __init__(self, root: Path, spokes: list[str], **cohorts: Any) -> None:
        self.engine = make_engine(f"sqlite:///{root / 'hub.db'}")
        self.sites: dict[str, Site] = {}
        with Session(self.engine) as session:
            for spoke in spokes:
                key = SigningKey.generate()
                self.sites[spoke] = Site(_config(root, spoke, **cohorts), key)
                session.add(Spoke(id=spoke, name=spoke))
                session.flush()
                session.add(SpokeKey(keyid=key.keyid, spoke_id=spoke,
                                     public_key_pem=key.public.pem))
            session.commit()
        self.forwards: list[PsiForward] = []

    def create(self, mode: str, spokes: list[str]) -> str:
        with Session(self.engine) as session:
            run = hub_psi.create(session, mode, spokes, "test", "coordinator",
                                 timedelta(hours=1))
            for spoke in spokes:
                self.sites[spoke].party.take_request(hub_psi.request_message(session, run, spoke))
            return run.id

    def _resolve(self, keyid: str) -> tuple[str, PublicKey] | None:
        for spoke, site in self.sites.items():
            if site.key.keyid == keyid:
                return spoke, site.key.public
        return None

    def pump(self, redeliver: bool = False, rounds: int | None = None) -> list[Any]:
        """Carry outboxes to the hub and forwards to the spokes until nothing moves (or
        for ``rounds`` rounds); ``redeliver`` delivers every forward twice. Returns the
        hub's outcomes."""
        outcomes: list[Any] = []
        for _ in range(rounds or 30):
            moved = False
            for site in self.sites.values():
                site.party.apply_decisions()
                rows = site.outbox()
                if rows:
                    messages = [open_from_spoke(r.body, self._resolve)[0] for r in rows]
                    with Session(self.engine) as session:
                        outcomes += ingest_batch(session, messages)
                    moved = True
            with Session(self.engine) as session:
                for record in hub_psi.pending_forwards(session):
                    forward = hub_psi.forward_message(record)
                    self.forwards.append(forward)
                    for _ in range(2 if redeliver else 1):
                        self.sites[forward.spoke_id].party.take_forward(forward)
                    hub_psi.forwarded_now(session, record, forward)
                    moved = True
                session.commit()
            for site in self.sites.values():
                moved = bool(site.party.work()) or moved
            if not moved:
                return outcomes
        if rounds is None:
            raise AssertionError("the PSI did not settle")
        return outcomes

    def read(self, psi_id: str) -> Any:
        with Session(self.engine) as session:
            run = session.get(PsiRun, psi_id)
            assert run is not None
            return hub_psi.read(session, run)

    def linked(self, spoke: str, psi_id: str) -> list[tuple[str, str]]:
        with Linkage(self.sites[spoke].config.work_dir) as linkage:
            return linkage.cases(psi_id)


def test_three_spokes_link_exactly_once_across_redeliveries_and_a_restart(
        tmp_path: Path) -> None:
    fed = Federation(tmp_path, list(HOLDINGS))
    psi_id = fed.create("intersection", list(HOLDINGS))
    fed.pump(redeliver=True, rounds=1)
    fed.sites["site-a"].restart()  # the leader stops between steps
    fed.pump(redeliver=True)
    result = fed.read(psi_id)
    assert (result.state, result.result_text) == ("done", "linked cohort of 15"), result
    tables = [fed.linked(s, psi_id) for s in HOLDINGS]
    assert len(tables[0]) == 15
    pseudonyms = [[p for p, _ in t] for t in tables]
    assert pseudonyms[0] == pseudonyms[1] == pseudonyms[2]
    # Each step was taken once: one request and one response per partner, one link each.
    with Session(fed.engine) as session:
        steps = [r.step for r in session.exec(select(PsiRelayRecord))]
    assert sorted(steps) == sorted(["hello"] * 4 + ["request", "response", "link"] * 2)


def test_two_spokes_cardinality_reveals_only_a_size(tmp_path: Path) -> None:
    fed = Federation(tmp_path, ["site-a", "site-b"])
    psi_id = fed.create("cardinality", ["site-a", "site-b"])
    fed.pump()
    assert fed.read(psi_id).result_text == "20"
    assert fed.linked("site-a", psi_id) == [] == fed.linked("site-b", psi_id)


def test_a_forged_hello_fails_the_psi_and_the_spoke_goes_on(tmp_path: Path) -> None:
    fed = Federation(tmp_path, ["site-a", "site-b"])
    psi_id = fed.create("intersection", ["site-a", "site-b"])
    mallory = SigningKey.generate()
    forged = psi_crypto.hello(mallory, psi_crypto.new_exchange_key(), psi_id, "site-b",
                              "site-a")
    fed.sites["site-a"].party.take_forward(PsiForward(
        psi_id=psi_id, spoke_id="site-a", from_spoke="site-b", step=PsiStep.HELLO,
        payload=forged, relay_message_id="forged-1"))
    fed.pump()
    result = fed.read(psi_id)
    assert result.state == "failed"
    leader = next(s for s in result.spokes if s.spoke_id == "site-a")
    assert leader.reason and "does not verify" in leader.reason
    assert fed.linked("site-a", psi_id) == []
    # The spoke still takes part in the next PSI.
    again = fed.create("cardinality", ["site-a", "site-b"])
    fed.pump()
    assert fed.read(again).result_text == "20"


def test_garbage_and_out_of_order_steps_fail_cleanly(tmp_path: Path) -> None:
    fed = Federation(tmp_path, ["site-a", "site-b"])
    psi_id = fed.create("intersection", ["site-a", "site-b"])
    # A 'request' to the leader is never expected; a response before any hello neither.
    fed.sites["site-b"].party.take_forward(PsiForward(
        psi_id=psi_id, spoke_id="site-b", from_spoke="site-a", step=PsiStep.REQUEST,
        payload="AAAA", relay_message_id="early-1"))
    fed.pump()
    partner = next(s for s in fed.read(psi_id).spokes if s.spoke_id == "site-b")
    assert partner.state == "failed" and "before its hello" in (partner.reason or "")


def test_the_hub_relays_nothing_out_of_protocol(tmp_path: Path) -> None:
    fed = Federation(tmp_path, list(HOLDINGS), approve_psi=True)
    psi_id = fed.create("cardinality", list(HOLDINGS))
    fed.pump()  # every spoke holds it for its steward: nothing is relayed yet

    def relay(sender: str, to: str, step: PsiStep) -> ProtocolError | bool:
        message = PsiRelay(psi_id=psi_id, spoke_id=sender, to_spoke=to, step=step,
                           payload="AAAA")
        with Session(fed.engine) as session:
            return ingest_batch(session, [message])[0]

    not_approved = relay("site-a", "site-b", PsiStep.HELLO)
    assert isinstance(not_approved, ProtocolError) and "held" in str(not_approved)
    for site in fed.sites.values():
        with PsiDesk(site.config.work_dir / "journal.db") as desk:
            desk.decide(psi_id, True, "dr-steward", None)
    fed.pump(rounds=1)
    for sender, to, step in (("site-b", "site-c", PsiStep.HELLO),  # partners never talk
                             ("site-b", "site-a", PsiStep.REQUEST),  # the leader asks
                             ("site-a", "site-b", PsiStep.LINK),  # no links in cardinality
                             ("site-a", "site-x", PsiStep.HELLO)):  # not a participant
        refused = relay(sender, to, step)
        assert isinstance(refused, ProtocolError), (sender, to, step)
    fed.pump()
    assert fed.read(psi_id).result_text == "15"


def test_a_steward_refusal_is_reported_with_its_reason(tmp_path: Path) -> None:
    fed = Federation(tmp_path, ["site-a", "site-b"], approve_psi=True)
    psi_id = fed.create("intersection", ["site-a", "site-b"])
    with PsiDesk(fed.sites["site-b"].config.work_dir / "journal.db") as desk:
        [held] = desk.requests()
        assert (held.request.purpose, held.request.leader) == ("test", "site-a")
        desk.decide(psi_id, False, "dr-steward", "no ethics approval")
        with pytest.raises(LookupError):
            desk.decide(psi_id, True, "dr-steward", None)  # decided once
    fed.pump()
    result = fed.read(psi_id)
    assert result.state == "refused"
    refused = next(s for s in result.spokes if s.spoke_id == "site-b")
    assert "no ethics approval" in (refused.reason or "") and "dr-steward" in refused.reason


def test_the_agreed_identifier_may_not_be_releasable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="link_identifier"):
        SpokeConfig.model_validate({
            "spoke_id": "site-a", "data_dir": str(tmp_path), "work_dir": str(tmp_path / "w"),
            "hub_public_key": str(tmp_path / "hub.pub"),
            "policy": {"releasable_attributes": ["consortium_id"]},
            "cohorts": {"link_identifier": "consortium_id"}})


def test_a_site_without_the_identifier_refuses(tmp_path: Path) -> None:
    fed = Federation(tmp_path, ["site-a", "site-b"])
    fed.sites["site-b"].config = fed.sites["site-b"].config.model_copy(update={
        "cohorts": fed.sites["site-b"].config.cohorts.model_copy(
            update={"link_identifier": None})})
    fed.sites["site-b"].restart()
    psi_id = fed.create("cardinality", ["site-a", "site-b"])
    fed.pump()
    result = fed.read(psi_id)
    assert result.state == "refused" and result.result_text == "refused"
    assert "link_identifier" in json.dumps([s.reason for s in result.spokes])


def test_relayed_payloads_and_status_reasons_are_bounded() -> None:
    """The channels table's PSI rows (docs/security.md): a payload at the bound passes,
    one past it is refused; so is a reason past 2000 characters."""
    from pydantic import ValidationError

    from tributary.protocol.cohorts.psi import MAX_PAYLOAD_CHARS, PsiState, PsiStatus

    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    assert str(MAX_PAYLOAD_CHARS) in text[text.index("## Channels out of a spoke"):]
    fields = {"psi_id": "psi-1", "spoke_id": "site-a", "to_spoke": "site-b",
              "step": PsiStep.HELLO}
    assert PsiRelay(payload="A" * MAX_PAYLOAD_CHARS, **fields)
    with pytest.raises(ValidationError):
        PsiRelay(payload="A" * (MAX_PAYLOAD_CHARS + 4), **fields)
    with pytest.raises(ValidationError):
        PsiRelay(payload="not base64!", **fields)
    assert PsiStatus(psi_id="psi-1", spoke_id="site-a", state=PsiState.REFUSED,
                     reason="x" * 2000)
    with pytest.raises(ValidationError):
        PsiStatus(psi_id="psi-1", spoke_id="site-a", state=PsiState.REFUSED, reason="x" * 2001)


def test_the_relay_holds_the_documented_number_of_identifiers() -> None:
    """docs/cohorts.md states how many identifiers a PSI's relay carries: the partner's
    response holds both sites' blinded sets (base64 inside JSON, encrypted, base64 again),
    so the leader's and the partner's identifiers together must stay under about 22,000.
    bench/bench_cohorts.py found the earlier figure (25,000 a site) twice too high."""
    import os

    from tributary.protocol.cohorts.psi import MAX_PAYLOAD_CHARS

    def response(leader: int, partner: int) -> int:
        _, request = psi_crypto.client_request([f"C-{i:09d}" for i in range(leader)], True)
        answer = psi_crypto.server_answer([f"C-{i:09d}" for i in range(partner)], request,
                                          True)
        return len(psi_crypto.encrypt(os.urandom(32), answer, "p", "a", "b", "response"))

    text = " ".join((Path(__file__).resolve().parents[2] / "docs" / "cohorts.md")
                    .read_text().split())
    assert "about 11,000 identifiers per site" in text
    assert "together at most about 22,000" in text
    assert response(11_000, 11_000) <= MAX_PAYLOAD_CHARS < response(11_500, 11_500)
    assert response(16_000, 6_000) <= MAX_PAYLOAD_CHARS < response(16_000, 7_000)
