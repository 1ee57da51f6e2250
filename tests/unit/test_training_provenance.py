"""A training study's provenance, its bundle and the dashboard's view of its rounds, on the
rows of real rounds (three spoke participants and the hub's state machine in one process,
as in test_training_rounds): a round with a spoke dropping after masking, a round a silent
spoke sat out. The bundle verifies offline with the hub's key alone; altering any byte, or
a ledger re-signed by another key, fails it; the epsilon in it is recomputed independently
with dp-accounting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dp_accounting
import pytest
from sqlmodel import Session
from unit.test_training_rounds import Federation

from tributary.hub.models import TrainingStudy
from tributary.hub.services import training_export, training_view
from tributary.protocol.bundle import MANIFEST, sign_manifest, verify_bundle
from tributary.protocol.signing import SigningKey
from tributary.protocol.training.bundle import LEDGER, MODELS, write_training_bundle
from tributary.protocol.training.provenance import (
    TrainingProvenance,
    open_provenance,
    problems,
    sign_provenance,
)

Z, DELTA = 0.8, 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Federation, TrainingProvenance,
                                                            SigningKey]:
    fed = Federation(tmp_path_factory.mktemp("fed"), rounds=3, z=Z, budget=1e6)
    assert fed.run_round(0).stage == "aggregated"
    fed.dropped_after_masking = {"spoke-c"}
    assert fed.run_round(1).stage == "aggregated"
    fed.dropped_after_masking = set()
    fed.silent = {"spoke-b"}
    assert fed.run_round(2).stage == "aggregated"
    assert fed.run_round(3) is None  # finished
    key = SigningKey.generate()
    with Session(fed.engine) as session:
        study = session.get(TrainingStudy, fed.study_id)
        prov = training_export.provenance(session, study, key)
    return fed, prov, key


def independent_epsilon(rounds: int) -> float:
    """dp-accounting directly: sensitivity 2C (replace one site's update), sigma zC."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(Z / 2), rounds)
    return float(accountant.get_epsilon(DELTA))


def test_provenance_records_every_round_and_model(run) -> None:  # type: ignore[no-untyped-def]
    fed, prov, key = run
    assert prov.state == "finished" and prov.study.id == fed.study_id
    assert [(r.round, r.outcome) for r in prov.rounds] == [(0, "aggregated"), (1, "aggregated"),
                                                            (2, "aggregated")]
    assert prov.rounds[1].participants == ["spoke-a", "spoke-b", "spoke-c"]
    # c dropped after masking: its update is in the sum all the same (SecAgg+ recovers it)
    assert prov.rounds[1].survivors == ["spoke-a", "spoke-b", "spoke-c"]
    assert prov.rounds[2].participants == ["spoke-a", "spoke-c"]  # b sat it out
    assert len(prov.models) == 4  # initial, then one per aggregated round
    for r, before, after in zip(prov.rounds, prov.models[:-1], prov.models[1:], strict=True):
        assert (r.global_model_in, r.global_model_out) == (before.digest, after.digest)
    # spoke-b joined rounds 0 and 1, the others all three: the study's epsilon is 3 rounds'
    assert prov.epsilon_spent == pytest.approx(independent_epsilon(3), rel=1e-9)
    assert len(prov.ledgers["spoke-b"].charges) == 2
    assert prov.rounds[0].epsilon_round == pytest.approx(independent_epsilon(1), rel=1e-9)
    assert problems(prov, key.public) == []
    assert open_provenance(sign_provenance(key, prov), key.public) == prov


def test_provenance_problems_are_found(run) -> None:  # type: ignore[no-untyped-def]
    _, prov, key = run
    other = SigningKey.generate()
    assert problems(prov, other.public)  # models signed by another key
    wrong = prov.model_copy(update={"epsilon_spent": prov.epsilon_spent / 2})
    assert any("epsilon_spent" in p for p in problems(wrong, key.public))
    ledgers = {s: v.model_copy(update={"charges": v.charges[:-1]})
               for s, v in prov.ledgers.items()}
    short = prov.model_copy(update={"ledgers": ledgers})
    assert any("charges" in p for p in problems(short, key.public))
    from tributary.protocol.messages import ProtocolError
    with pytest.raises(ProtocolError):
        open_provenance(sign_provenance(other, prov), key.public)


def _bundle(tmp_path: Path, prov: TrainingProvenance, key: SigningKey) -> tuple[Path, Path]:
    folder = write_training_bundle(tmp_path / "bundle", prov, key)
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "hub.pub").write_text(key.public.pem)
    return folder, keys


def test_training_bundle_verifies_and_any_altered_byte_fails(  # type: ignore[no-untyped-def]
        run, tmp_path: Path) -> None:
    _, prov, key = run
    folder, keys = _bundle(tmp_path, prov, key)
    report = verify_bundle(folder, keys)
    assert report.ok, report.problems
    assert report.training_rounds == 3
    for name in ("training-study.json", LEDGER, MODELS, "ro-crate-metadata.json"):
        copy = tmp_path / f"altered-{name}"
        shutil.copytree(folder, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        altered = verify_bundle(copy, keys)
        assert not altered.ok and any(name in p for p in altered.problems), name


def test_a_forged_ledger_resigned_by_another_key_fails(  # type: ignore[no-untyped-def]
        run, tmp_path: Path) -> None:
    _, prov, key = run
    folder, keys = _bundle(tmp_path, prov, key)
    ledger = json.loads((folder / LEDGER).read_text())
    ledger["spoke-b"]["charges"] = ledger["spoke-b"]["charges"][:1]
    (folder / LEDGER).write_text(json.dumps(ledger))
    sign_manifest(folder, SigningKey.generate())
    assert not verify_bundle(folder, keys).ok
    sign_manifest(folder, key)  # even signed by the hub, it disagrees with the provenance
    report = verify_bundle(folder, keys)
    assert not report.ok and any(LEDGER in p for p in report.problems)
    assert (folder / MANIFEST).is_file()


def test_the_view_shows_dropouts_and_deltas(run) -> None:  # type: ignore[no-untyped-def]
    fed, _, _ = run
    with Session(fed.engine) as session:
        state = training_view.study_state(session, fed.study_id)
    assert state is not None and state["study"]["state"] == "finished"
    rounds = state["rounds"]
    assert rounds[1]["dropped_after_masking"] == ["spoke-c"] and rounds[1]["not_joined"] == []
    assert rounds[0]["dropped_after_masking"] == [] == rounds[0]["dropped_before_masking"]
    assert rounds[2]["not_joined"] == ["spoke-b"]
    assert [len(r["survived"]) for r in rounds] == [3, 3, 2]
    earlier = {"study": {**state["study"], "state": "running"}, "rounds": rounds[:2]}
    change = training_view.delta(earlier, state)
    assert change is not None and change["delta"] is True
    assert [r["round"] for r in change["rounds"]] == [2]  # only the new attempt
    assert training_view.delta(state, state) is None
    assert training_view.is_over(state) and not training_view.is_over(earlier)
    points = training_view.points(rounds)
    assert [p.survived for p in points] == [3, 3, 2]
    assert training_view.studies(Session(fed.engine))[0].rounds_done == 3


def test_the_provenance_records_the_server_optimiser(tmp_path: Path) -> None:
    fed = Federation(tmp_path, rounds=1, strategy="fedadagrad", server_lr=0.2, tau=1e-3)
    key = SigningKey.generate()
    with Session(fed.engine) as session:
        prov = training_export.provenance(session, session.get(TrainingStudy, fed.study_id),
                                          key)
    assert prov.study.strategy == "fedadagrad"
    assert prov.study.server_optimiser == {"kind": "fedadagrad", "server_lr": 0.2,
                                           "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    back = open_provenance(sign_provenance(key, prov), key.public)
    assert back.study.server_optimiser == prov.study.server_optimiser
