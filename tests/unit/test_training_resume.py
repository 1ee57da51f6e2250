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
from pydantic import ValidationError
from sqlmodel import Session, col, select

from tributary.hub.db import make_engine
from tributary.hub.models import Algorithm, AuditEvent, TrainingRound, TrainingStudy, utcnow
from tributary.hub.schemas import TrainingStudyCreate
from tributary.hub.services import training, training_close, training_optimiser
from tributary.hub.services.launch import algorithm_ref
from tributary.hub.services.server_optimisers import OptimiserState, ServerOptimiser, step
from tributary.hub.training_coordinator import TrainingCoordinator
from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.signing import SigningKey
from tributary.protocol.training import rounds as msg
from tributary.protocol.training.secagg import vector_from_bytes
from tributary.protocol.training.tensors import encode_tensors
from tributary.protocol.training.update import flatten, schema_of
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

    def __init__(self, tmp_path: Path, rounds: int = 2, **settings: object) -> None:
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
            initial_model="sha256:" + "1" * 64, min_participants=2, **settings)
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

    def get(self, location: str) -> bytes:
        return (self.objects / location.replace("/", "_")).read_bytes()

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


def to_unmask(hub: Hub, params: Mapping[str, np.ndarray]) -> None:
    """Open the study's next round and drive it until every spoke answered the unmask
    stage (committed), the global model being ``params``."""
    with Session(hub.engine) as session:
        study = session.get(TrainingStudy, hub.study_id)
        nxt = training.next_step(session, study)
        row = training.open_round(session, study, 4, nxt.round_index, nxt.attempt)
        session.commit()
        replies = hub.answer(hub.pending(session, study, row), params)
        while True:
            hub.receive(session, row, replies)
            if row.stage == "unmask":
                return
            out, _ = training.advance(session, study, row, hub.load, 4)
            session.commit()
            replies = hub.answer(out)


def close(hub: Hub, session: Session, params: Mapping[str, np.ndarray]
          ) -> tuple[np.ndarray, msg.ObjectRef, dict[str, np.ndarray]]:
    """Aggregate the open round and step to the next model (not committed)."""
    study = session.get(TrainingStudy, hub.study_id)
    row = training.current_round(session, study)
    _, mean = training.advance(session, study, row, hub.load, 4)
    assert mean is not None
    ref, new = training_optimiser.next_model(session, hub, study, row, params, mean)
    return mean, ref, new


def test_a_server_optimiser_resumes_with_its_moments_after_restarts(tmp_path: Path) -> None:
    hub = Hub(tmp_path, rounds=3, strategy="fedadam", server_lr=0.3, beta_1=0.5)
    settings = ServerOptimiser(kind="fedadam", server_lr=0.3, beta_1=0.5)
    schema = schema_of(START)
    params: Mapping[str, np.ndarray] = START
    reference, state = flatten(START, schema), OptimiserState()
    for round_index in range(3):
        to_unmask(hub, params)
        with Session(hub.engine) as session:
            if round_index == 1:  # aggregated, model and moments written, then killed
                _, crashed, _ = close(hub, session, params)
                session.rollback()
                hub.restart()
        with Session(hub.engine) as session:
            mean, ref, params = close(hub, session, params)
            session.commit()
            if round_index == 1:  # the same step from the same committed state
                assert ref.digest == crashed.digest
        hub.restart()  # every round's close in a new process: only the rows and the store
        reference, state = step(settings, reference, mean, state)
        np.testing.assert_allclose(flatten(params, schema), reference, rtol=0, atol=1e-12)
    # With the moments lost (a fresh start), the last round would have stepped elsewhere.
    fresh, _ = step(settings, reference, mean, OptimiserState())
    assert not np.allclose(fresh, step(settings, reference, mean, state)[0])
    with Session(hub.engine) as session:
        study = session.get(TrainingStudy, hub.study_id)
        assert study.strategy == "fedadam"
        assert study.server_optimiser == settings.model_dump(mode="json")
        rows = training.rounds_of(session, study.id)
        assert [r.round_index for r in rows] == [0, 1, 2] and all(
            r.optimiser_state_out for r in rows)
        index, digest = training_optimiser.state_into(session, study, 3)
        stored = training_optimiser.state_going_into(session, hub, study, 3, 4)
        assert (index, digest) == (3, rows[-1].optimiser_state_out)
        assert stored.steps == 3
        np.testing.assert_array_equal(stored.m, state.m)
        np.testing.assert_array_equal(stored.v, state.v)
        # The spokes train plainly: the optimiser is the hub's alone.
        opened = training.round_open_message(
            study, rows[0], msg.ObjectRef(digest=rows[0].global_model_in, location="m",
                                          size=1), "sig", lambda s: "u", "spoke-a")
        assert opened.strategy == "fedavg"


def test_a_stored_optimiser_state_is_checked_before_use() -> None:
    state = OptimiserState(steps=2, m=np.ones(4), v=np.full(4, 0.5))
    data = training_optimiser.encode_state(state)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    back = training_optimiser.decode_state(data, digest, 4)
    assert back.steps == 2 and np.array_equal(back.v, state.v)
    with pytest.raises(training_optimiser.OptimiserStateError, match="digest"):
        training_optimiser.decode_state(data[:-1] + b" ", digest, 4)
    with pytest.raises(training_optimiser.OptimiserStateError, match="not 5"):
        training_optimiser.decode_state(data, digest, 5)
    bad = encode_tensors({"steps": np.array([1]), "m": np.ones(4, np.float32),
                          "v": np.ones(4, np.float32)})
    with pytest.raises(training_optimiser.OptimiserStateError, match="float64"):
        training_optimiser.decode_state(bad, "sha256:" + hashlib.sha256(bad).hexdigest(), 4)
    junk = b"not a tensor file"
    with pytest.raises(training_optimiser.OptimiserStateError, match="unreadable"):
        training_optimiser.decode_state(junk, "sha256:" + hashlib.sha256(junk).hexdigest(), 4)


@pytest.mark.parametrize(("settings", "error"), [
    ({"strategy": "fedavg", "server_lr": 0.5}, "for fedadam, fedyogi, fedadagrad only"),
    ({"strategy": "fedprox", "tau": 1e-3}, "for fedadam, fedyogi, fedadagrad only"),
    ({"strategy": "fedyogi", "beta_1": 1.0}, "less than 1"),
    ({"strategy": "fedadagrad", "server_lr": float("inf")}, "server_lr"),
    ({"strategy": "fedadam", "tau": 0}, "greater than 0"),
    ({"strategy": "sgd"}, "strategy"),
])
def test_server_optimiser_settings_are_validated(settings: dict, error: str) -> None:
    base = {"name": "s", "algorithm_id": 1, "spokes": SPOKES, "rounds": 1,
            "clip_bound": 1.0, "noise_multiplier": 1.0, "epsilon_budget": 1.0,
            "delta": 1e-5, "initial_model": "sha256:" + "1" * 64}
    with pytest.raises(ValidationError, match=error):
        training.StudySpec(**base, **settings)
    api = {k: v for k, v in base.items() if k != "initial_model"}
    with pytest.raises(ValidationError, match=error):
        TrainingStudyCreate(**api, **settings, initial_model_b64="AAAA")


def test_a_round_is_closed_once_however_often_its_close_runs(tmp_path: Path) -> None:
    """The close (the Celery task's body) run again, as by a redelivered task in another
    process, gives back the same model and changes nothing; a round not ready is left."""
    hub = Hub(tmp_path, rounds=2, strategy="fedyogi")
    data = encode_tensors(START)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    hub.put(training.model_location(hub.study_id, 0, digest), data)
    with Session(hub.engine) as session:
        study = session.get(TrainingStudy, hub.study_id)
        study.global_model = digest
        session.add(study)
        session.commit()
    to_unmask(hub, START)
    with Session(hub.engine) as session:
        with pytest.raises(training.TrainingError, match="no round"):
            training_close.close_round(session, hub, "ts-none-r0-a1")
        round_id = training.current_round(
            session, session.get(TrainingStudy, hub.study_id)).round_id
        first, params = training_close.close_round(session, hub, round_id)
    hub.restart()
    with Session(hub.engine) as session:
        again, same = training_close.close_round(session, hub, round_id)
        assert again == first and all(np.array_equal(same[k], params[k]) for k in params)
        study = session.get(TrainingStudy, hub.study_id)
        assert {s: len(v["charges"]) for s, v in study.ledgers.items()} == dict.fromkeys(
            SPOKES, 1)
        actions = [e.action for e in session.exec(select(AuditEvent).where(
            col(AuditEvent.target).startswith(round_id)))]
        assert actions.count("training.round_aggregated") == 1
        assert actions.count("training.optimiser_state") == 1
        nxt = training.next_step(session, study)
        assert (nxt.action, nxt.round_index, nxt.model_digest) == ("open", 1, first.digest)
        row = training.open_round(session, study, 4, 1)
        session.commit()
        assert training_close.close_round(session, hub, row.round_id) is None  # at keys
        assert training.current_round(session, study).stage == "keys"


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
