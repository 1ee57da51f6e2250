"""A hub that stops anywhere in a round resumes from the database alone: what to do next
(``next_step``) and which messages of the open stage to send again (``pending_messages``)
are derived from the rows, a spoke's repeated message is not counted twice, and a round
whose aggregation was not committed is aggregated again to the same result, charged once.
Three real spoke participants, messages through their JSON encoding, SQLite."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from approved_algorithms import approved_algorithm
from sqlmodel import Session, select

from tributary.hub.db import make_engine
from tributary.hub.models import Algorithm, AuditEvent, TrainingRound, TrainingStudy, utcnow
from tributary.hub.services import training
from tributary.hub.services.launch import algorithm_ref
from tributary.hub.training_coordinator import TrainingCoordinator
from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.signing import SigningKey
from tributary.protocol.training import rounds as msg
from tributary.protocol.training.secagg import vector_from_bytes
from tributary.spoke.training import LocalResult, TrainingParticipant

SPOKES = ["spoke-a", "spoke-b", "spoke-c"]
START = {"w": np.zeros(3), "b": np.zeros(1)}
#: What each spoke's "training" adds to the global model, and its sample count.
STEPS = {"spoke-a": (np.array([1.0, 0.0, -1.0, 0.5]), 10),
         "spoke-b": (np.array([0.0, 2.0, 1.0, -0.5]), 20),
         "spoke-c": (np.array([-1.0, 1.0, 0.0, 1.0]), 40)}
HANDLERS = {msg.RoundOpen: "on_round_open", msg.Keys: "on_keys", msg.Delivery: "on_delivery",
            msg.Consistency: "on_consistency", msg.Unmask: "on_unmask"}


def trainer(spoke: str):
    def train(open_: msg.RoundOpen, params: Mapping[str, np.ndarray]) -> LocalResult:
        step, count = STEPS[spoke]
        return LocalResult({"b": params["b"] + step[:1], "w": params["w"] + step[1:]},
                           num_examples=count, loss=float(count))
    return train


class Hub:
    """The hub's database, the store (a folder) and three participants; :meth:`restart`
    drops every object of the hub's process and keeps only the database file."""

    def __init__(self, tmp_path: Path, rounds: int = 2) -> None:
        self.path = tmp_path / "hub.db"
        self.objects = tmp_path / "objects"
        self.objects.mkdir()
        self.engine = make_engine(f"sqlite:///{self.path}")
        self.spokes = {s: TrainingParticipant(me=s, train=trainer(s), upload=self.put,
                                              release_loss=True)
                       for s in SPOKES}
        with Session(self.engine) as session:
            algorithm_id = approved_algorithm(session).id
            session.commit()
        spec = training.StudySpec(
            name="resume", algorithm_id=algorithm_id, spokes=SPOKES, rounds=rounds,
            clip_bound=100.0, noise_multiplier=1e-9, epsilon_budget=1e30, delta=1e-5,
            initial_model="sha256:" + "1" * 64, min_participants=2)
        with Session(self.engine) as session:
            self.study_id = training.launch(session, spec, "coordinator").id
            session.commit()

    def restart(self) -> None:
        self.engine.dispose()
        self.engine = make_engine(f"sqlite:///{self.path}")

    def put(self, location: str, data: bytes) -> msg.ObjectRef:
        (self.objects / location.replace("/", "_")).write_bytes(data)
        return msg.ObjectRef(digest="sha256:" + hashlib.sha256(data).hexdigest(),
                             location=location, size=len(data))

    def load(self, location: str) -> np.ndarray:
        return vector_from_bytes((self.objects / location.replace("/", "_")).read_bytes(),
                                 32, 4)

    def answer(self, out: list, params: Mapping[str, np.ndarray] = START,
               only: set[str] | None = None) -> list[tuple[str, msg.TrainingFromSpoke]]:
        """Each spoke's reply to the hub's messages (through JSON both ways)."""
        replies = []
        for receiver, message in out:
            if only is not None and receiver not in only:
                continue
            message = msg.decode_training_from_hub(message.model_dump_json())
            spoke = self.spokes[receiver]
            if isinstance(message, msg.RoundOpen):
                reply = spoke.on_round_open(message, params)
            else:
                reply = getattr(spoke, HANDLERS[type(message)])(message)
            replies.append((receiver, msg.decode_training_from_spoke(reply.model_dump_json())))
        return replies

    def pending(self, session: Session, study: TrainingStudy, row: TrainingRound) -> list:
        return training.pending_messages(
            study, row, msg.ObjectRef(digest=row.global_model_in, location="m", size=1), "sig",
            lambda s: f"{row.round_id}-{s}.masked")

    def receive(self, session: Session, row: TrainingRound, replies: list) -> None:
        for sender, reply in replies:
            training.receive(session, row, reply, sender)
        session.commit()


def bodies(out: list) -> list:
    """The messages without their envelope (a new id and time for each sending)."""
    return [(r, m.model_dump(exclude={"message_id", "sent_at"})) for r, m in out]


def open_first(hub: Hub) -> tuple[list, str]:
    with Session(hub.engine) as session:
        study = session.get(TrainingStudy, hub.study_id)
        step = training.next_step(session, study)
        assert step == training.NextStep(action="open", model_digest="sha256:" + "1" * 64)
        row = training.open_round(session, study, 4, step.round_index, step.attempt)
        session.commit()
        return hub.pending(session, study, row), row.round_id


def test_resume_sends_the_open_stage_again_and_counts_each_spoke_once(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    opens, round_id = open_first(hub)
    assert sorted(r for r, _ in opens) == SPOKES
    joins = hub.answer(opens)
    with Session(hub.engine) as session:
        row = training.current_round(session, session.get(TrainingStudy, hub.study_id))
        hub.receive(session, row, joins[:2])  # two joined, then the hub is killed

    hub.restart()
    with Session(hub.engine) as session:
        study = session.get(TrainingStudy, hub.study_id)
        step = training.next_step(session, study)
        assert (step.action, step.round_id, step.model_index) == ("drive", round_id, 0)
        row = training.current_round(session, study)
        # Only the spoke that has not joined is asked again...
        assert [r for r, _ in hub.pending(session, study, row)] == ["spoke-c"]
        assert not training.all_answered(row)
        # ...and a join redelivered after the restart changes nothing.
        hub.receive(session, row, joins)
        hub.receive(session, row, joins)
        assert row.num_examples == {"spoke-a": 10, "spoke-b": 20, "spoke-c": 40}
        assert training.all_answered(row)
        out, _ = training.advance(session, study, row, hub.load, 4)
        session.commit()
        assert row.stage == "shares"
        # Killed after the commit, before sending: the restarted hub sends the same keys.
        again = hub.pending(session, study, row)
        assert bodies(again) == bodies(out)
        replies = hub.answer(again)
        for _stage in ("shares", "masked", "consistency"):
            hub.receive(session, row, replies)
            out, _ = training.advance(session, study, row, hub.load, 4)
            session.commit()
            assert bodies(hub.pending(session, study, row)) == bodies(out)  # a restart's
            replies = hub.answer(out)
        assert row.stage == "unmask"
        hub.receive(session, row, replies)
        # Aggregated but killed before the commit: nothing of it is kept...
        _, first = training.advance(session, study, row, hub.load, 4)
        assert first is not None
        session.rollback()

    hub.restart()
    with Session(hub.engine) as session:
        study = session.get(TrainingStudy, hub.study_id)
        step = training.next_step(session, study)
        assert (step.action, step.round_id) == ("drive", round_id)
        row = training.current_round(session, study)
        assert row.stage == "unmask" and study.ledgers == {}
        # ...and the restarted hub aggregates the same sum once, charging each spoke once.
        _, mean = training.advance(session, study, row, hub.load, 4)
        training.set_global_model(session, study, row, "sha256:" + "2" * 64)
        session.commit()
        np.testing.assert_allclose(mean, first, atol=1e-9)
        plain = sum(STEPS[s][0] * STEPS[s][1] for s in SPOKES) / sum(
            STEPS[s][1] for s in SPOKES)
        np.testing.assert_allclose(mean, plain, atol=1e-5)
        assert {s: len(v["charges"]) for s, v in study.ledgers.items()} == dict.fromkeys(
            SPOKES, 1)
        assert row.mean_loss == pytest.approx((10 * 10 + 20 * 20 + 40 * 40) / 70)
        assert training.next_step(session, study) == training.NextStep(
            action="open", round_index=1, model_index=1, model_digest="sha256:" + "2" * 64)


def test_next_step_after_a_retry_an_end_and_an_inconsistent_row(tmp_path: Path) -> None:
    hub = Hub(tmp_path, rounds=1)
    open_first(hub)
    with Session(hub.engine) as session:
        study = session.get(TrainingStudy, hub.study_id)
        row = training.current_round(session, study)
        row.stage = "retried"
        session.add(row)
        session.commit()
        # The next attempt of the same round, on the same global model.
        assert training.next_step(session, study) == training.NextStep(
            action="open", round_index=0, attempt=2, model_digest="sha256:" + "1" * 64)
        row.stage = "aggregated"  # without its next model: never committed that way
        session.add(row)
        session.commit()
        with pytest.raises(training.TrainingError, match="without a next model"):
            training.next_step(session, study)
        study.state = "finished"
        session.add(study)
        session.commit()
        assert training.next_step(session, study).action == "done"


def test_model_location_is_derived_from_study_round_and_digest() -> None:
    digest = "sha256:" + "ab" * 32
    assert training.model_location("ts-1", 3, digest) == \
        f"global/{training.model_location('ts-1', 3, digest).split('/', 1)[1]}"
    assert training.model_location("ts-1", 3, digest).endswith("ts-1-" + "ab" * 8
                                                               + ".safetensors")
    assert training.model_location("ts-1", 3, digest) != training.model_location(
        "ts-1", 4, digest)


def test_round_open_carries_the_approved_version_and_a_revoked_one_ends_the_study(
        tmp_path: Path) -> None:
    """Every ``RoundOpen`` carries the study's version exactly as a validation launch
    builds it (image, release signature, the hub's approval); once the version is revoked
    the hub's loop opens nothing more with it and ends the study, audited."""
    hub = Hub(tmp_path)
    with Session(hub.engine) as session:
        study = session.get(TrainingStudy, hub.study_id)
        algorithm = session.get(Algorithm, study.algorithm_id)
        image = training.study_image(session, study)
        assert image == algorithm_ref(algorithm) and image is not None
        assert (image.reference, image.approval) == (study.algorithm, algorithm.approval)
        row = training.open_round(session, study, 4, 0)
        session.commit()
        out = training.pending_messages(
            study, row, msg.ObjectRef(digest=row.global_model_in, location="m", size=1),
            "sig", lambda s: f"{row.round_id}-{s}.masked", image)
        opened = [msg.decode_training_from_hub(m.model_dump_json()) for _, m in out]
        assert [(m.image, m.algorithm) for m in opened] == [(image, study.algorithm)] * 3
        algorithm.revoked_at, algorithm.revoked_reason = utcnow(), "a leak"
        session.add(algorithm)
        session.commit()
        with pytest.raises(training.AlgorithmRefused, match="revoked: a leak"):
            training.study_image(session, study)
    # The hub's loop itself (no broker or store is touched once the version is refused).
    broker = StompClient(BrokerSettings(federation="t-unused"), "hub-training")
    coordinator = TrainingCoordinator(hub.engine, broker, None, SigningKey.generate(),  # type: ignore[arg-type]
                                      None, "t-unused")
    assert coordinator.step(hub.study_id) is False
    with Session(hub.engine) as session:
        study = session.get(TrainingStudy, hub.study_id)
        assert study.state == "failed"
        assert study.stop_reason == "algorithm refused: logreg 1 is revoked: a leak"
        assert session.exec(select(AuditEvent).where(
            AuditEvent.action == "training.failed")).one().target == hub.study_id
