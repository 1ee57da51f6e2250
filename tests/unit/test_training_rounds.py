"""The hub's training round state machine with three real spoke participants in one
process: every message goes through its JSON encoding (as over the broker), masked vectors
through a content-addressed folder, the hub's state through SQLite. The algorithm is a
numpy logistic regression on non-IID synthetic sites."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from approved_algorithms import approved_algorithm
from sqlmodel import Session, select

from tributary.hub.db import make_engine
from tributary.hub.models import AuditEvent, TrainingRound, TrainingStudy, utcnow
from tributary.hub.services import training
from tributary.protocol.training import rounds as msg
from tributary.protocol.training.privacy import epsilon_after
from tributary.protocol.training.secagg import vector_from_bytes
from tributary.spoke.training import LocalResult, TrainingParticipant, TrainingRefused

SPOKES = ["spoke-a", "spoke-b", "spoke-c"]
FEATURES = 4
TRUE_W = np.array([1.5, -2.0, 1.0, 0.5])


def site_data(seed: int, shift: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(shift, 1.0, size=(n, FEATURES))
    p = 1 / (1 + np.exp(-(x @ TRUE_W - shift * TRUE_W.sum())))
    return x, (rng.random(n) < p).astype(float)


def fit(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray, steps: int,
        lr: float = 0.5) -> tuple[np.ndarray, float]:
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        w = w - lr * x.T @ (p - y) / len(y)
        b = b - lr * float(np.mean(p - y))
    return w, b


def accuracy(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(((x @ w + b) > 0) == (y > 0.5)))


SITES = {s: site_data(i, shift, n) for i, (s, shift, n)
         in enumerate(zip(SPOKES, (-0.5, 0.0, 0.7), (300, 120, 200), strict=True))}


def trainer(spoke: str):
    def train(open_: msg.RoundOpen, params: Mapping[str, np.ndarray]) -> LocalResult:
        x, y = SITES[spoke]
        w, b = fit(params["w"], float(params["b"][0]), x, y, steps=20)
        return LocalResult({"w": w, "b": np.array([b])}, num_examples=len(y))
    return train


class FolderStore:
    """Content-addressed objects in a folder (the e2e path uses SeaweedFS)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, location: str, data: bytes) -> msg.ObjectRef:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.root / location).write_bytes(data)
        return msg.ObjectRef(digest=digest, location=location, size=len(data))

    def get(self, location: str) -> bytes:
        return (self.root / location).read_bytes()


def wire(message, decode):
    """Through the broker's encoding: JSON out, parsed and validated back."""
    return decode(message.model_dump_json())


class Federation:
    def __init__(self, tmp_path: Path, **study) -> None:
        self.engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
        self.store = FolderStore(tmp_path / "objects")
        self.spokes = {s: TrainingParticipant(me=s, train=trainer(s), upload=self.store.put)
                       for s in SPOKES}
        self.params = {"w": np.zeros(FEATURES), "b": np.zeros(1)}
        with Session(self.engine) as session:
            algorithm_id = approved_algorithm(session).id
            session.commit()
        spec = training.StudySpec(
            name="logreg", algorithm_id=algorithm_id, spokes=SPOKES,
            rounds=study.pop("rounds", 4), clip_bound=study.pop("clip", 5.0),
            noise_multiplier=study.pop("z", 0.01), epsilon_budget=study.pop("budget", 1e6),
            delta=1e-5, initial_model="sha256:" + "0" * 64, min_participants=2, **study)
        with Session(self.engine) as session:
            self.study_id = training.launch(session, spec, "coordinator").id
            session.commit()
        self.dropped_after_masking: set[str] = set()
        self.silent: set[str] = set()

    def vector_length(self) -> int:
        return sum(v.size for v in self.params.values())

    def load(self, location: str) -> np.ndarray:
        return vector_from_bytes(self.store.get(location), 32, self.vector_length())

    def run_round(self, index: int, attempt: int = 1) -> TrainingRound | None:
        """Open, then close each stage when everyone answered (or at its deadline)."""
        with Session(self.engine) as session:
            study = session.get(TrainingStudy, self.study_id)
            row = training.open_round(session, study, self.vector_length(), index, attempt)
            session.commit()
            if row is None:
                return None
            inbox = []
            for s in SPOKES:
                if s in self.silent:
                    continue
                opened = training.round_open_message(
                    study, row, msg.ObjectRef(digest=study.global_model, location="m", size=1),
                    "sig", lambda spoke: f"{row.round_id}-{spoke}.masked", s)
                opened = wire(opened, msg.decode_training_from_hub)
                try:
                    inbox.append((s, self.spokes[s].on_round_open(opened, self.params)))
                except TrainingRefused:
                    continue
            mean = None
            for _stage in range(6):
                for sender, m in inbox:
                    m = wire(m, msg.decode_training_from_spoke)
                    training.receive(session, row, m, sender)
                session.commit()
                now = None
                if not training.ready(row):  # someone is silent: let the deadline pass
                    now = utcnow() + timedelta(seconds=study.round_deadline_s + 1)
                out, mean = training.advance(session, study, row, self.load,
                                             self.vector_length(), now=now)
                session.commit()
                if row.stage in ("aggregated", "retried"):
                    break
                inbox = []
                for receiver, m in out:
                    m = wire(m, msg.decode_training_from_hub)
                    if isinstance(m, msg.Consistency) and receiver in self.dropped_after_masking:
                        continue
                    handler = {msg.Keys: "on_keys", msg.Delivery: "on_delivery",
                               msg.Consistency: "on_consistency", msg.Unmask: "on_unmask"}
                    inbox.append((receiver, getattr(self.spokes[receiver],
                                                    handler[type(m)])(m)))
            if mean is not None:
                sizes = {"b": 1, "w": FEATURES}
                self.params = {"b": self.params["b"] + mean[:sizes["b"]],
                               "w": self.params["w"] + mean[sizes["b"]:]}
                digest = "sha256:" + hashlib.sha256(
                    json.dumps({k: v.tolist() for k, v in self.params.items()}).encode()
                ).hexdigest()
                training.set_global_model(session, study, row, digest)
                session.commit()
            session.refresh(row)
            session.expunge(row)
            return row


def plain_round(params: Mapping[str, np.ndarray], spokes: list[str]) -> np.ndarray:
    """FedAvg weighted by sample count, in the clear: what the protected round estimates."""
    deltas, weights = [], []
    for s in spokes:
        x, y = SITES[s]
        w, b = fit(params["w"], float(params["b"][0]), x, y, steps=20)
        deltas.append(np.concatenate([[b - params["b"][0]], w - params["w"]]))
        weights.append(len(y))
    return np.average(deltas, axis=0, weights=weights)


def independent_epsilon(rounds: int, z: float, delta: float) -> float:
    """dp-accounting directly: a Gaussian mechanism of sensitivity 2C and sigma zC per round."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z / 2), rounds)
    return accountant.get_epsilon(delta)


def noise_tolerance(z: float, clip: float, spokes: list[str]) -> float:
    """Six standard deviations of the noise in the weighted mean (sigma = zC per spoke)."""
    weight = sum(len(SITES[s][1]) for s in spokes) / max(len(SITES[s][1]) for s in spokes)
    return 6 * z * clip * np.sqrt(len(spokes)) / weight


def test_protected_round_equals_plain_weighted_fedavg(tmp_path: Path) -> None:
    """With negligible noise the unmasked, dequantised, reweighted sum is plain FedAvg
    by sample count within quantisation error (sigma here is 5e-7)."""
    fed = Federation(tmp_path, rounds=1, z=1e-7, budget=1e15)
    before = {k: v.copy() for k, v in fed.params.items()}
    assert fed.run_round(0).stage == "aggregated"
    after = np.concatenate([fed.params["b"], fed.params["w"]])
    expected = plain_round(before, SPOKES)
    assert np.max(np.abs(after - np.concatenate([before["b"], before["w"]]) - expected)) < 1e-5
    # and unweighted averaging would be visibly different: the weights matter here
    deltas = [plain_round(before, [s]) for s in SPOKES]
    assert np.max(np.abs(np.mean(deltas, axis=0) - expected)) > 1e-2


def test_rounds_train_a_model_close_to_plain_fedavg_and_central(tmp_path: Path) -> None:
    fed = Federation(tmp_path, rounds=4)
    for index in range(4):
        before = {k: v.copy() for k, v in fed.params.items()}
        row = fed.run_round(index)
        assert row is not None and row.stage == "aggregated", row and row.outcome_reason
        after = np.concatenate([fed.params["b"], fed.params["w"]])
        expected = np.concatenate([before["b"], before["w"]]) + plain_round(before, SPOKES)
        assert np.max(np.abs(after - expected)) < noise_tolerance(0.01, 5.0, SPOKES)
    x = np.concatenate([SITES[s][0] for s in SPOKES])
    y = np.concatenate([SITES[s][1] for s in SPOKES])
    w, b = fit(np.zeros(FEATURES), 0.0, x, y, steps=80)
    central = accuracy(w, b, x, y)
    federated = accuracy(fed.params["w"], float(fed.params["b"][0]), x, y)
    assert federated > 0.7 and abs(federated - central) < 0.05, (federated, central)
    assert fed.run_round(4) is None  # the study is finished after its rounds
    with Session(fed.engine) as session:
        study = session.get(TrainingStudy, fed.study_id)
        assert study.state == "finished"
        rows = session.exec(select(TrainingRound)).all()
        assert [r.epsilon_cumulative for r in rows] == pytest.approx(
            [independent_epsilon(i + 1, 0.01, 1e-5) for i in range(4)])
        actions = [e.action for e in session.exec(select(AuditEvent))]
        assert actions.count("training.round_aggregated") == 4
        assert "training.finished" in actions


def test_hub_stores_no_single_update(tmp_path: Path) -> None:
    """Nothing the hub stored for a round (rows, objects) yields one spoke's update: every
    stored masked vector, dequantised alone, is far from that spoke's real update."""
    fed = Federation(tmp_path, rounds=1)
    before = {k: v.copy() for k, v in fed.params.items()}
    row = fed.run_round(0)
    assert row.stage == "aggregated"
    with Session(fed.engine) as session:
        dump = json.dumps([r.model_dump(mode="json") for r in session.exec(select(TrainingRound))])
    from tributary.hub.services.training import quantisation_for
    with Session(fed.engine) as session:
        q = quantisation_for(session.get(TrainingStudy, fed.study_id), 3)
    from tributary.protocol.training.update import dequantise_sum
    for s in SPOKES:
        assert f"{row.round_id}-{s}.masked" in dump  # only the location is stored
        x, y = SITES[s]
        w, b = fit(before["w"], 0.0, x, y, steps=20)
        real = np.concatenate([[b], w])
        alone = dequantise_sum(fed.load(f"{row.round_id}-{s}.masked"), q, 1)
        assert np.max(np.abs(alone - real)) > 1.0  # masked: unrelated to the update


def test_dropout_after_masking_is_recovered(tmp_path: Path) -> None:
    fed = Federation(tmp_path, rounds=1)
    fed.dropped_after_masking = {"spoke-c"}
    before = {k: v.copy() for k, v in fed.params.items()}
    row = fed.run_round(0)
    assert row.stage == "aggregated"
    # spoke-c masked its input, so it is in the sum although it never unmasked.
    expected = plain_round(before, SPOKES)
    after = np.concatenate([fed.params["b"], fed.params["w"]])
    base = np.concatenate([before["b"], before["w"]])
    assert np.max(np.abs(after - base - expected)) < noise_tolerance(0.01, 5.0, SPOKES)


def test_too_few_spokes_retry_then_fail_safely(tmp_path: Path) -> None:
    fed = Federation(tmp_path, rounds=1, max_attempts=2)
    fed.silent = {"spoke-b", "spoke-c"}
    row = fed.run_round(0, attempt=1)
    assert (row.stage == "retried" and "minimum" in row.outcome_reason) or "threshold" in (
        row.outcome_reason or "")
    assert fed.params["w"].tolist() == [0.0] * FEATURES  # nothing applied
    row = fed.run_round(0, attempt=2)
    assert row.stage == "retried"
    with Session(fed.engine) as session:
        study = session.get(TrainingStudy, fed.study_id)
        assert study.state == "failed"
        assert session.exec(select(AuditEvent).where(
            AuditEvent.action == "training.round_retried")).all()


def test_budget_stops_the_study_and_site_cap_refuses(tmp_path: Path) -> None:
    one, two = epsilon_after(1, 0.8, 1e-5), epsilon_after(2, 0.8, 1e-5)
    fed = Federation(tmp_path, rounds=10, z=0.8, budget=(two + epsilon_after(3, 0.8, 1e-5)) / 2)
    fed.spokes["spoke-c"].caps[fed.study_id] = (one + two) / 2
    assert fed.run_round(0).stage == "aggregated"
    row = fed.run_round(1)  # spoke-c refuses beyond its cap; two spokes suffice
    assert row.stage == "aggregated"
    assert sorted(row.num_examples) == ["spoke-a", "spoke-b"]
    assert fed.run_round(2) is None
    with Session(fed.engine) as session:
        study = session.get(TrainingStudy, fed.study_id)
        assert study.state == "stopped_budget"
        assert training.study_epsilon_now(study) == pytest.approx(two)
        assert study.ledgers["spoke-c"]["charges"].__len__() == 1


def test_the_loss_leaves_only_where_the_site_allows_it(tmp_path: Path) -> None:
    """The local loss travels in clear with Join, outside the DP guarantee: only a spoke
    whose policy says ``release_loss`` sends it."""
    fed = Federation(tmp_path)

    def with_loss(open_: msg.RoundOpen, params: Mapping[str, np.ndarray]) -> LocalResult:
        result = trainer(SPOKES[0])(open_, params)
        return LocalResult(result.parameters, result.num_examples, loss=0.4321)

    with Session(fed.engine) as session:
        study = session.get(TrainingStudy, fed.study_id)
        row = training.open_round(session, study, fed.vector_length(), 0, 1)
        session.commit()
        joins = {}
        for release in (False, True):
            participant = TrainingParticipant(me=SPOKES[0], train=with_loss,
                                              upload=fed.store.put, release_loss=release)
            opened = training.round_open_message(
                study, row, msg.ObjectRef(digest=study.global_model, location="m", size=1),
                "sig", lambda spoke: f"{row.round_id}-{spoke}.masked", SPOKES[0])
            joins[release] = wire(participant.on_round_open(opened, fed.params),
                                  msg.decode_training_from_spoke)
    assert joins[False].loss is None and '"loss":null' in joins[False].model_dump_json()
    assert joins[True].loss == 0.4321


def test_a_refusal_ends_the_wait_for_that_spoke(tmp_path: Path) -> None:
    """A spoke's decisive refusal (its policy, an untrusted image, a failed run) counts it
    out of the attempt at once, audited: the stage closes as soon as the others answered,
    not at its deadline. A ``protocol`` refusal (which may answer a message sent twice)
    does not; a refusal naming another attempt, or from a non-participant, is refused."""
    fed = Federation(tmp_path, rounds=1)
    with Session(fed.engine) as session:
        study = session.get(TrainingStudy, fed.study_id)
        row = training.open_round(session, study, fed.vector_length(), 0)
        session.commit()
        for s in SPOKES[:2]:
            opened = wire(training.round_open_message(
                study, row, msg.ObjectRef(digest=study.global_model, location="m", size=1),
                "sig", lambda spoke: f"{row.round_id}-{spoke}.masked", s),
                msg.decode_training_from_hub)
            training.receive(session, row, wire(fed.spokes[s].on_round_open(opened, fed.params),
                                                msg.decode_training_from_spoke), s)
        session.commit()
        assert not training.ready(row)  # spoke-c is waited for until the deadline

        def refusal(reason: str, attempt: int = 1) -> msg.Refusal:
            return wire(msg.Refusal(study_id=study.id, round_id=row.round_id, round_index=0,
                                    attempt=attempt, reason=reason, detail="site policy"),
                        msg.decode_training_from_spoke)

        assert training.count_out(session, row, refusal("protocol"), "spoke-c") is False
        assert not training.ready(row)
        with pytest.raises(training.TrainingError, match="another round"):
            training.count_out(session, row, refusal("epsilon_cap", attempt=2), "spoke-c")
        with pytest.raises(training.TrainingError, match="not a participant"):
            training.count_out(session, row, refusal("epsilon_cap"), "spoke-x")
        assert training.count_out(session, row, refusal("epsilon_cap"), "spoke-c") is True
        assert training.count_out(session, row, refusal("epsilon_cap"), "spoke-c") is False
        session.commit()
        assert training.ready(row) and training.all_answered(row)
        assert training.pending_messages(
            study, row, msg.ObjectRef(digest=study.global_model, location="m", size=1), "sig",
            lambda spoke: spoke) == []  # nobody is sent anything again
        out, _ = training.advance(session, study, row, fed.load, fed.vector_length())
        session.commit()
        assert row.stage == "shares" and sorted(r for r, _ in out) == SPOKES[:2]
        assert row.refused == {"spoke-c": "epsilon_cap"}
        events = session.exec(select(AuditEvent).where(
            AuditEvent.action == "training.spoke_counted_out")).all()
        assert [(e.target, e.detail["spoke"], e.detail["stage"], e.detail["reason"])
                for e in events] == [(row.round_id, "spoke-c", "keys", "epsilon_cap")]


def test_a_lapsed_member_is_left_out_of_the_next_rounds(tmp_path: Path) -> None:
    """A spoke whose membership credential the hub's check refused is not asked into the
    next round (audited); the others train on without it. With fewer than two members left
    the study fails with the reason."""
    from tributary.hub.models import Spoke
    from tributary.hub.services import credentials
    from tributary.protocol.cohorts.authority import DID_FILE, STATUS_FILE, Authority
    from tributary.protocol.signing import SigningKey

    fed = Federation(tmp_path, rounds=3)
    authority = Authority.init(tmp_path / "authority", "did:web:authority.example.org",
                               "tributary", "https://authority.example.org/status/1")
    policy = credentials.Policy((authority.folder / DID_FILE,),
                                (authority.folder / STATUS_FILE,), 0, "tributary")
    with Session(fed.engine) as session:
        for s in SPOKES:
            if session.get(Spoke, s) is None:
                session.add(Spoke(id=s, name=s))
            session.flush()
            token, _ = authority.issue(s, f"did:web:{s}.example.org",
                                       [SigningKey.generate().keyid], timedelta(days=30))
            credentials.present(session, policy, s, token, "admin")
        session.commit()
    assert sorted(fed.run_round(0).participants) == SPOKES
    authority.revoke(next(c.id for c in authority.state.issued if c.spoke_id == "spoke-c"),
                     "agreement ended")
    credentials.check_all(fed.engine, policy)
    fed.silent = {"spoke-c"}  # the coordinator sends a round only to its participants
    row = fed.run_round(1)
    assert row.stage == "aggregated"
    assert sorted(row.participants) == ["spoke-a", "spoke-b"]
    assert sorted(row.num_examples) == ["spoke-a", "spoke-b"]
    with Session(fed.engine) as session:
        excluded = session.exec(select(AuditEvent).where(
            AuditEvent.action == "training.spokes_excluded")).all()
        assert excluded and "revoked" in excluded[0].detail["spokes"]["spoke-c"]
    authority.revoke(next(c.id for c in authority.state.issued if c.spoke_id == "spoke-b"),
                     "agreement ended")
    credentials.check_all(fed.engine, policy)
    assert fed.run_round(2) is None
    with Session(fed.engine) as session:
        study = session.get(TrainingStudy, fed.study_id)
        assert study.state == "failed" and "fewer than two members" in study.stop_reason
