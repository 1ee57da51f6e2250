"""A spoke that dies after masking but before its masked vector is uploaded and announced:
the vector was spooled and the state journaled first, so the restarted spoke uploads the
very same vector (no second noise draw) and the round aggregates with it once. Without the
spooled vector it refuses to mask again."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from unit.test_training_rounds import SPOKES, Federation, plain_round

from tributary.protocol.training import rounds as msg
from tributary.spoke.training import (
    TrainingParticipant,
    TrainingRefused,
    open_state,
    seal_state,
)

KEY = os.urandom(32)


class Crash(RuntimeError):
    """The process dies here."""


def crashing_spoke(fed: Federation, spoke: str, spool: Path,
                   lose_spool: bool = False) -> dict[str, Any]:
    """Make ``spoke`` persist its sealed state to a 'disk', die in its first upload, and
    come back from that disk to answer the redelivered message."""
    seen: dict[str, Any] = {"uploads": []}
    first = fed.spokes[spoke]
    first.spool = spool

    def persist() -> None:
        seen["disk"] = seal_state(first.state(), KEY)

    def dying_upload(location: str, data: bytes) -> msg.ObjectRef:
        raise Crash("killed before the upload")
    first.persist, first.upload = persist, dying_upload

    original = first.on_delivery

    def on_delivery(message: msg.Delivery) -> msg.Masked:
        with pytest.raises(Crash):
            original(message)
        if lose_spool:
            for path in spool.iterdir():
                path.unlink()
        restarted = TrainingParticipant(me=spoke, train=first.train, upload=upload,
                                        spool=spool, persist=lambda: None)
        restarted.restore(open_state(seen["disk"], KEY))
        seen["pending"] = restarted.rounds[message.delivery.round_id].pending
        fed.spokes[spoke] = restarted
        return restarted.on_delivery(message)  # the broker redelivers it

    def upload(location: str, data: bytes) -> msg.ObjectRef:
        seen["uploads"].append(data)
        return fed.store.put(location, data)
    first.on_delivery = on_delivery  # type: ignore[method-assign]
    return seen


def test_a_restarted_spoke_uploads_the_vector_it_masked_before_dying(tmp_path: Path) -> None:
    fed = Federation(tmp_path, rounds=1, z=1e-7, budget=1e15)
    before = {k: v.copy() for k, v in fed.params.items()}
    seen = crashing_spoke(fed, SPOKES[0], tmp_path / "spool")
    row = fed.run_round(0)
    assert row.stage == "aggregated" and sorted(row.secagg["masked"]) == SPOKES
    assert len(seen["uploads"]) == 1
    assert hashlib.sha256(seen["uploads"][0]).hexdigest() == seen["pending"].sha256
    assert row.secagg["masked"][SPOKES[0]]["sha256"] == seen["pending"].sha256
    assert list((tmp_path / "spool").iterdir()) == []  # removed once announced
    # and the round is plain weighted FedAvg: that spoke counted once
    after = np.concatenate([fed.params["b"], fed.params["w"]])
    expected = plain_round(before, SPOKES)
    assert np.max(np.abs(after - np.concatenate([before["b"], before["w"]]) - expected)) < 1e-5


def test_without_its_spooled_vector_a_spoke_does_not_mask_twice(tmp_path: Path) -> None:
    fed = Federation(tmp_path, rounds=1, z=1e-7, budget=1e15)
    crashing_spoke(fed, SPOKES[0], tmp_path / "spool", lose_spool=True)
    with pytest.raises(TrainingRefused, match="does not mask its update twice"):
        fed.run_round(0)


def spooling_spokes(fed: Federation, spool: Path, journals: dict[str, bytes]) -> None:
    """Give every spoke a spool with a key and a journal ('disk') written after each
    message, as the training agent does."""
    for name, spoke in fed.spokes.items():
        spoke.spool, spoke.spool_key = spool / name, KEY

        def persist(spoke: TrainingParticipant = spoke, name: str = name) -> None:
            journals[name] = seal_state(spoke.state(), KEY)
        spoke.persist = persist
        for stage in ("on_round_open", "on_keys"):
            original = getattr(spoke, stage)

            def persisted(*args: Any, original: Any = original, persist: Any = persist) -> Any:
                answer = original(*args)
                persist()
                return answer
            setattr(spoke, stage, persisted)


def test_the_update_waits_sealed_in_the_spool_not_in_the_journal(tmp_path: Path) -> None:
    fed = Federation(tmp_path, rounds=1, z=1e-7, budget=1e15)
    before = {k: v.copy() for k, v in fed.params.items()}
    journals: dict[str, bytes] = {}
    spooling_spokes(fed, tmp_path / "spool", journals)
    seen: dict[str, Any] = {}
    first = fed.spokes[SPOKES[0]]

    def restart_then_deliver(message: msg.Delivery) -> msg.Masked:
        """Between joining and masking, the spoke restarts from its journal and spool."""
        round_id = message.delivery.round_id
        state = open_state(journals[SPOKES[0]], KEY)
        kept = state.rounds[round_id]
        assert kept.delta_b64 is None and kept.delta_sha256 is not None
        sealed = first._delta_path(round_id).read_bytes()
        seen["delta"] = np.frombuffer(first._delta(round_id, kept), dtype="<f8")
        assert seen["delta"].tobytes() not in sealed  # sealed at rest
        restarted = TrainingParticipant(me=SPOKES[0], train=first.train, upload=first.upload,
                                        spool=first.spool, spool_key=KEY,
                                        persist=lambda: None)
        restarted.restore(state)
        fed.spokes[SPOKES[0]] = restarted
        return restarted.on_delivery(message)
    first.on_delivery = restart_then_deliver  # type: ignore[method-assign]
    row = fed.run_round(0)
    assert row.stage == "aggregated" and sorted(row.secagg["masked"]) == SPOKES
    assert np.abs(seen["delta"]).max() > 0
    assert not any((tmp_path / "spool").rglob("*.update"))  # gone once masked
    after = np.concatenate([fed.params["b"], fed.params["w"]])
    expected = plain_round(before, SPOKES)
    assert np.max(np.abs(after - np.concatenate([before["b"], before["w"]]) - expected)) < 1e-5


@pytest.mark.parametrize("damage", ["lost", "altered"])
def test_a_spoke_whose_spooled_update_is_damaged_sends_no_other(tmp_path: Path,
                                                                damage: str) -> None:
    fed = Federation(tmp_path, rounds=1, z=1e-7, budget=1e15)
    spooling_spokes(fed, tmp_path / "spool", {})
    first = fed.spokes[SPOKES[0]]
    original = first.on_delivery

    def damaged(message: msg.Delivery) -> msg.Masked:
        path = first._delta_path(message.delivery.round_id)
        if damage == "lost":
            path.unlink()
        else:
            blob = bytearray(path.read_bytes())
            blob[20] ^= 1
            path.write_bytes(bytes(blob))
        return original(message)
    first.on_delivery = damaged  # type: ignore[method-assign]
    with pytest.raises(TrainingRefused, match="lost or altered"):
        fed.run_round(0)
