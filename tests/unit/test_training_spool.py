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
