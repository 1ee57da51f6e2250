"""A spoke whose membership lapses mid-study, on a real hub database and the real broker:
the watch's pass withdraws it from the running experiment (a signed cancellation on its
queue only; its target cancelled with the reason, its queued cases cancelled, audited per
experiment and once per spoke), what it sends afterwards is refused (quarantined with the
reason, audited), the other spoke completes the study, and a renewed credential does not
bring the spoke back. Its training, vertical and PSI messages are refused too."""

from __future__ import annotations

import queue
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from signed_results import Spokes, accept, audited_hub, send_result, study_of
from sqlmodel import Session, select

from tributary.hub.models import (
    AuditEvent,
    CaseResult,
    Experiment,
    ExperimentTarget,
    PsiMember,
    PsiRun,
    QuarantinedMessage,
    VerticalStudy,
)
from tributary.hub.services import control, credentials, lapse, psi, vertical
from tributary.hub.services.ingest import ingest
from tributary.protocol.broker import BrokerSettings, Delivery, StompClient
from tributary.protocol.cohorts import vertical as vmsg
from tributary.protocol.cohorts.authority import DID_FILE, STATUS_FILE, Authority
from tributary.protocol.destinations import spoke_queue
from tributary.protocol.messages import CancelExperimentMessage, ExperimentStatusMessage
from tributary.protocol.messages import ExperimentState as SpokeState
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import open_from_hub
from tributary.services.settings import ServiceSettings

pytestmark = pytest.mark.e2e

CASES = ["c1", "c2", "c3"]


def membership(tmp_path: Path) -> tuple[str, Authority, credentials.Policy]:
    """A federation of its own, its authority, and the hub's policy trusting it."""
    federation = f"lapse{uuid.uuid4().hex[:8]}"
    authority = Authority.init(tmp_path / "authority", "did:web:authority.example.org",
                               federation, "https://authority.example.org/status/1")
    return federation, authority, credentials.Policy(
        (authority.folder / DID_FILE,), (authority.folder / STATUS_FILE,), 0, federation)


def broker(service_settings: ServiceSettings, federation: str, name: str) -> StompClient:
    return StompClient(BrokerSettings(host=service_settings.host,
                                      port=service_settings.broker_port,
                                      federation=federation), name).start(wait=30)


def members(session: Session, authority: Authority, policy: credentials.Policy,
            spokes: Spokes) -> None:
    """North and south present 30-day credentials naming their keys (committed)."""
    for spoke in ("north", "south"):
        token, _ = authority.issue(spoke, f"did:web:{spoke}.example.org",
                                   [spokes.keys[spoke].keyid], timedelta(days=30))
        credentials.present(session, policy, spoke, token, "admin")
    session.commit()


def events(session: Session, action: str, target: str | None = None) -> list[AuditEvent]:
    query = select(AuditEvent).where(AuditEvent.action == action)
    if target is not None:
        query = query.where(AuditEvent.target == target)
    return list(session.exec(query).all())


def test_a_revoked_spoke_is_withdrawn_and_its_later_results_are_refused(
        tmp_path: Path, service_settings: ServiceSettings) -> None:
    federation, authority, policy = membership(tmp_path)
    engine = audited_hub(tmp_path)
    spokes = study_of(engine, ["north", "south"], ["north", "south"], CASES)
    hub_key = SigningKey.generate()
    client = broker(service_settings, federation, "hub")
    listener = broker(service_settings, federation, "spokes")
    boxes: dict[str, queue.Queue[Delivery]] = {s: queue.Queue() for s in ("north", "south")}
    try:
        for spoke, box in boxes.items():
            listener.subscribe(spoke_queue(spoke, federation), box.put)
        with Session(engine) as session:
            members(session, authority, policy, spokes)
            # Both members: a pass withdraws nobody.
            credentials.check_all(engine, policy)
            assert lapse.withdraw_lapsed(session, client, hub_key, timedelta(days=1)) == {}
            assert send_result(session, spokes, "exp", "north", "c1", {"n": 1})
            assert send_result(session, spokes, "exp", "south", "c1", {"n": 1})
            # A private set intersection and a vertical study between the two, unfinished.
            run_id = psi.create(session, "cardinality", ["south", "north"], "linkage",
                                "coordinator", timedelta(days=1)).id
            study_id = vertical.create(
                session, name="vertical", psi_id=run_id, features_spoke="north",
                label_spoke="south", features_attributes=["f"], label_attributes=["g"],
                label="y", positive=1, hyperparameters=vmsg.Hyperparameters(),
                release_coefficients=False, created_by="coordinator").id
            session.commit()

        north_id = next(c.id for c in authority.state.issued if c.spoke_id == "north")
        authority.revoke(north_id, "agreement ended")
        credentials.check_all(engine, policy)
        with Session(engine) as session:
            withdrawn = lapse.withdraw_lapsed(session, client, hub_key, timedelta(days=1))
            assert withdrawn == {"north": ["exp"]}

            # The cancellation crossed the broker to north only, signed by the hub.
            delivery = boxes["north"].get(timeout=20)
            message = open_from_hub(delivery.body, [hub_key.public])
            assert isinstance(message, CancelExperimentMessage)
            assert message.experiment_id == "exp" and message.spoke_id == "north"
            assert message.reason.startswith("membership credential refused: ")
            assert "revoked" in message.reason
            listener.ack(delivery)
            time.sleep(1)
            assert boxes["south"].empty()

            target = session.get(ExperimentTarget, ("exp", "north"))
            assert target is not None and target.state == "cancelled"
            assert target.withdrawn_at is not None and target.reason == message.reason
            assert session.get(ExperimentTarget, ("exp", "south")).state == "accepted"
            north_cases = {r.case_id: r for r in session.exec(select(CaseResult).where(
                CaseResult.spoke_id == "north"))}
            assert north_cases["c1"].state == "succeeded"  # received while it was a member
            assert {north_cases[c].state for c in ("c2", "c3")} == {"cancelled"}
            assert "withdrawn: membership credential refused" in north_cases["c2"].note
            per_study = events(session, "experiment.spoke_withdrawn", "exp")
            assert len(per_study) == 1 and per_study[0].detail["spoke"] == "north"
            assert "revoked" in per_study[0].detail["reason"]
            per_spoke = events(session, "spoke.withdrawn", "north")
            assert len(per_spoke) == 1 and per_spoke[0].detail["experiments"] == ["exp"]

            # The PSI and the vertical study, which need every party, ended with the reason.
            assert session.get(PsiRun, run_id).state == "failed"
            member = session.get(PsiMember, (run_id, "north"))
            assert member.state == "failed" and member.reason == message.reason
            assert events(session, "psi.member_withdrawn", run_id)
            study = session.get(VerticalStudy, study_id)
            assert study.state == "failed" and message.reason in study.reason
            assert events(session, "vertical.failed", study_id)

            # A second pass sends nothing again.
            assert lapse.withdraw_lapsed(session, client, hub_key, timedelta(days=1)) == {}

            # A result north produced (it says) before the lapse, arriving now: refused,
            # kept aside with the reason, audited; acknowledged (ingest returns, no raise).
            assert not send_result(session, spokes, "exp", "north", "c2", {"n": 5})
            refused = events(session, "result.quarantined", "exp")
            assert refused and "after the spoke was withdrawn" in refused[-1].detail["reason"]
            assert "membership credential refused" in refused[-1].detail["reason"]
            assert session.exec(select(QuarantinedMessage).where(
                QuarantinedMessage.claimed_spoke == "north")).first() is not None
            row = session.exec(select(CaseResult).where(CaseResult.spoke_id == "north",
                                                        CaseResult.case_id == "c2")).one()
            assert row.state == "cancelled" and row.output is None
            # Its "completed" does not complete its target; its confirmation keeps the reason.
            for state in (SpokeState.COMPLETED, SpokeState.ACCEPTED, SpokeState.CANCELLED):
                ingest(session, ExperimentStatusMessage(
                    experiment_id="exp", spoke_id="north", state=state, case_ids=CASES,
                    reason="cancelled on request"))
                session.expire_all()
                target = session.get(ExperimentTarget, ("exp", "north"))
                assert target.state == "cancelled" and target.reason == message.reason
            assert events(session, "message.after_withdrawal", "exp")

            # South goes on and the study completes without north.
            for case in ("c2", "c3"):
                assert send_result(session, spokes, "exp", "south", case, {"n": 1})
            ingest(session, ExperimentStatusMessage(experiment_id="exp", spoke_id="south",
                                                    state=SpokeState.COMPLETED,
                                                    case_ids=CASES))
            session.expire_all()
            assert session.get(Experiment, "exp").state == "completed"
            # Its failed cases are not run again either.
            with pytest.raises(control.NotAllowed):
                control.retry(session, client, hub_key, session.get(Experiment, "exp"),
                              "coordinator", None, ["north"], None, timedelta(days=1))

        # Renewed: the credential is valid again, the spoke is not silently re-added.
        with Session(engine) as session:
            token, _ = authority.issue("north", "did:web:north.example.org",
                                       [spokes.keys["north"].keyid], timedelta(days=30))
            credentials.present(session, policy, "north", token, "admin")
            session.commit()
        credentials.check_all(engine, policy)
        with Session(engine) as session:
            assert credentials.member_refusal(session, "north") is None
            assert lapse.withdraw_lapsed(session, client, hub_key, timedelta(days=1)) == {}
            target = session.get(ExperimentTarget, ("exp", "north"))
            assert target.state == "cancelled" and target.withdrawn_at is not None
        assert boxes["north"].empty()
    finally:
        client.close()
        listener.close()


def test_a_hub_that_cannot_check_credentials_withdraws_nobody(
        tmp_path: Path, service_settings: ServiceSettings) -> None:
    """The authority's document unreadable, then its status list expired or gone: every
    credential is refused (launches too), but no site lapsed, so nobody is withdrawn; once
    the files are back, a real revocation withdraws its spoke."""
    federation, authority, policy = membership(tmp_path)
    engine = audited_hub(tmp_path)
    spokes = study_of(engine, ["north", "south"], ["north", "south"], ["c1"])
    client = broker(service_settings, federation, "hub")
    key = SigningKey.generate()
    try:
        with Session(engine) as session:
            members(session, authority, policy, spokes)
        for broken in (DID_FILE, STATUS_FILE):
            saved = (authority.folder / broken).read_bytes()
            (authority.folder / broken).write_text("{not json")
            credentials.check_all(engine, policy)
            with Session(engine) as session:
                assert set(lapse.lapsed(session)) == {"north", "south"}
                assert credentials.policy_problem(policy) is not None
                assert lapse.withdraw_lapsed(session, client, key, timedelta(days=1),
                                             policy) == {}
                assert {t.state for t in session.exec(select(ExperimentTarget))} == {
                    "accepted"}
            (authority.folder / broken).write_bytes(saved)
        authority.revoke(next(c.id for c in authority.state.issued
                              if c.spoke_id == "north"), "breach")
        credentials.check_all(engine, policy)
        with Session(engine) as session:
            assert lapse.withdraw_lapsed(session, client, key, timedelta(days=1),
                                         policy) == {"north": ["exp"]}
    finally:
        client.close()


def test_a_study_whose_last_open_target_lapses_completes(
        tmp_path: Path, service_settings: ServiceSettings) -> None:
    """South is done; north lapses before it finishes: withdrawing it completes the study."""
    federation, authority, policy = membership(tmp_path)
    engine = audited_hub(tmp_path)
    spokes = study_of(engine, ["north", "south"], ["north", "south"], ["c1"])
    client = broker(service_settings, federation, "hub")
    try:
        with Session(engine) as session:
            token, _ = authority.issue("north", "did:web:north.example.org",
                                       [spokes.keys["north"].keyid], timedelta(seconds=2))
            credentials.present(session, policy, "north", token, "admin")
            session.commit()
            assert send_result(session, spokes, "exp", "south", "c1", {"n": 1})
            accept(session, "exp", "south", ["c1"])
            ingest(session, ExperimentStatusMessage(experiment_id="exp", spoke_id="south",
                                                    state=SpokeState.COMPLETED,
                                                    case_ids=["c1"]))
            assert session.get(Experiment, "exp").state == "launched"
        time.sleep(3)  # north's credential expires
        credentials.check_all(engine, policy)
        with Session(engine) as session:
            assert lapse.withdraw_lapsed(session, client, SigningKey.generate(),
                                         timedelta(days=1)) == {"north": ["exp"]}
            session.expire_all()
            assert session.get(Experiment, "exp").state == "completed"
            assert "expired" in session.get(ExperimentTarget, ("exp", "north")).reason
    finally:
        client.close()


def test_a_lapsed_members_training_update_is_refused_over_the_broker(
        tmp_path: Path, service_settings: ServiceSettings) -> None:
    """Mid-round: the lapsed spoke's Join reaches the hub's training queue (really signed,
    really over the broker) and is refused, audited and acknowledged; the others' count."""
    import numpy as np
    from approved_algorithms import approved_algorithm

    from tributary.hub.models import Spoke, SpokeKey, TrainingRound, TrainingStudy
    from tributary.hub.services import training
    from tributary.hub.training_coordinator import TrainingCoordinator
    from tributary.protocol.training import rounds as msg
    from tributary.protocol.training.transport import hub_training_queue, seal_message
    from tributary.spoke.training import LocalResult, TrainingParticipant

    spoke_ids = ["spoke-a", "spoke-b", "spoke-c"]
    federation, authority, policy = membership(tmp_path)
    engine = audited_hub(tmp_path)
    keys = {s: SigningKey.generate() for s in spoke_ids}

    def train(open_: msg.RoundOpen, params: dict) -> LocalResult:
        return LocalResult({k: v + 1 for k, v in params.items()}, num_examples=10)

    participants = {s: TrainingParticipant(me=s, train=train, upload=lambda loc, data: msg.
                                           ObjectRef(digest="sha256:" + "0" * 64,
                                                     location=loc, size=len(data)))
                    for s in spoke_ids}
    with Session(engine) as session:
        for s in spoke_ids:
            session.add(Spoke(id=s, name=s))
            session.flush()
            session.add(SpokeKey(keyid=keys[s].keyid, spoke_id=s,
                                 public_key_pem=keys[s].public.pem))
            session.flush()
            token, _ = authority.issue(s, f"did:web:{s}.example.org", [keys[s].keyid],
                                       timedelta(days=30))
            credentials.present(session, policy, s, token, "admin")
        algorithm_id = approved_algorithm(session).id
        session.commit()
        study = training.launch(session, training.StudySpec(
            name="lapse", algorithm_id=algorithm_id, spokes=spoke_ids, rounds=2,
            clip_bound=100.0, noise_multiplier=1e-9, epsilon_budget=1e30, delta=1e-5,
            initial_model="sha256:" + "1" * 64, min_participants=2), "coordinator")
        session.commit()
        row = training.open_round(session, study, 4, 0)
        session.commit()
        opens = training.pending_messages(
            study, row, msg.ObjectRef(digest=row.global_model_in, location="m", size=1),
            "sig", lambda s: f"{row.round_id}-{s}.masked")
        round_id = row.round_id
    joins = {r: participants[r].on_round_open(
        msg.decode_training_from_hub(m.model_dump_json()),
        {"w": np.zeros(3), "b": np.zeros(1)}) for r, m in opens}
    authority.revoke(next(c.id for c in authority.state.issued if c.spoke_id == "spoke-c"),
                     "agreement ended")
    credentials.check_all(engine, policy)

    settings = BrokerSettings(host=service_settings.host, port=service_settings.broker_port,
                              federation=federation)
    hub_client = StompClient(settings, "hub-training").start(wait=30)
    spoke_client = StompClient(settings, "spokes").start(wait=30)
    coordinator = TrainingCoordinator(engine, hub_client, None, SigningKey.generate(),  # type: ignore[arg-type]
                                      None, federation)
    try:
        coordinator.start()
        for s in ("spoke-c", "spoke-a", "spoke-b"):
            spoke_client.publish(hub_training_queue(federation),
                                 seal_message(keys[s], joins[s]))
        deadline = time.monotonic() + 30
        while True:
            with Session(engine) as session:
                row = session.exec(select(TrainingRound).where(
                    TrainingRound.round_id == round_id)).one()
                joined = sorted(row.num_examples)
            if joined == ["spoke-a", "spoke-b"] and coordinator.refused:
                break
            assert time.monotonic() < deadline, (joined, coordinator.refused)
            time.sleep(0.2)
        assert "spoke-c: membership credential refused" in coordinator.refused[0]
        assert "revoked" in coordinator.refused[0]
        with Session(engine) as session:
            refused = events(session, "training.message_refused", "spoke-c")
            assert refused and refused[0].detail["kind"] == "Join"
            assert session.get(TrainingStudy, study.id).state == "running"
    finally:
        hub_client.close()
        spoke_client.close()
