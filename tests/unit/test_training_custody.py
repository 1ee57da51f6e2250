"""A masked update bound to its spoke's custody record: the statement's subject is the
masked object's digest, its predicate names the round, and records chain per spoke. The hub
accepts a masked input only with a record for exactly that object and round."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select
from unit.test_training_rounds import SPOKES, Federation

from tributary.hub.models import AuditEvent, TrainingCustody, TrainingRound, TrainingStudy
from tributary.hub.services.training import TrainingError
from tributary.hub.training_checks import check_masked_custody, keep_custody
from tributary.protocol.signing import SignatureError, SigningKey
from tributary.protocol.training import rounds as msg
from tributary.protocol.training.custody import (
    GENESIS,
    UpdateCustody,
    check_chain,
    record_hash,
    sign_update_custody,
    verify_update_custody,
)

OBJECT = "ab" * 32
ROUND = {"spoke_id": "site-a", "study_id": "ts-1", "round_id": "r-1", "round_index": 2,
         "attempt": 1, "image_digest": "reg/img@sha256:" + "c" * 64,
         "location": "spokes/site-a/000000002/r-1.masked"}


def record(sequence: int = 1, previous: str = GENESIS, **changes: Any) -> UpdateCustody:
    return UpdateCustody(**{**ROUND, "global_model_digest": "sha256:" + "d" * 64, "size": 40,
                            "num_examples": 7, "sequence": sequence,
                            "previous_record_sha256": previous, "spoke_version": "t",
                            "created_at": datetime.now(UTC), **changes})


def verify(envelope: dict, key: SigningKey, **changes: Any) -> UpdateCustody:
    expected = {**ROUND, "object_digest": "sha256:" + OBJECT, **changes}
    return verify_update_custody(envelope, key.public, **expected)


def test_a_record_binds_exactly_its_object_and_round() -> None:
    key = SigningKey.generate()
    envelope = sign_update_custody(key, record(), OBJECT)
    assert verify(envelope, key).round_index == 2
    for change in ({"object_digest": "sha256:" + "ef" * 32}, {"round_id": "r-2"},
                   {"attempt": 2}, {"round_index": 3}, {"study_id": "ts-2"},
                   {"spoke_id": "site-b"}, {"image_digest": "reg/img@sha256:" + "e" * 64},
                   {"location": "spokes/site-a/000000002/other.masked"}):
        with pytest.raises(SignatureError):
            verify(envelope, key, **change)
    with pytest.raises(SignatureError):  # another spoke's key
        verify(envelope, SigningKey.generate())
    forged = dict(envelope, payload=envelope["payload"][:-8] + "AAAAAAA=")
    with pytest.raises(SignatureError):
        verify(forged, key)


def test_records_chain_without_gap_or_reordering() -> None:
    key = SigningKey.generate()
    first = sign_update_custody(key, record(1), OBJECT)
    second = sign_update_custody(key, record(2, record_hash(first)), OBJECT)
    third = sign_update_custody(key, record(3, record_hash(second)), OBJECT)
    assert check_chain([first, second, third], key.public) == (3, record_hash(third))
    assert check_chain([third], key.public, (2, record_hash(second)))[0] == 3
    for broken in ([first, third], [second, first], [first, first]):
        with pytest.raises(SignatureError, match="chain broken"):
            check_chain(broken, key.public)
    stranger = sign_update_custody(SigningKey.generate(), record(2, record_hash(first)), OBJECT)
    with pytest.raises(SignatureError):
        check_chain([first, stranger], key.public)


def test_participants_bind_each_masked_update_and_the_hub_checks_it(tmp_path: Path) -> None:
    """Three participants with their keys over two rounds: every masked update the hub
    received carries a record it verifies, chained per spoke; a record moved to another
    round, or an update without one, is refused. The hub keeps each spoke's records: a
    redelivery is kept once, a fork (a second record under a kept sequence) and a gap are
    refused and audited."""
    fed = Federation(tmp_path, rounds=2, z=1e-3, budget=1e15)
    keys = {s: SigningKey.generate() for s in SPOKES}
    sent: dict[str, list[msg.Masked]] = {s: [] for s in SPOKES}
    for s, participant in fed.spokes.items():
        participant.key = keys[s]
        original = participant.on_delivery

        def capture(message: msg.Delivery, s: str = s, original: Any = original) -> msg.Masked:
            masked = original(message)
            sent[s].append(masked)
            return masked
        participant.on_delivery = capture  # type: ignore[method-assign]
    assert fed.run_round(0).stage == "aggregated"
    assert fed.run_round(1).stage == "aggregated"
    with Session(fed.engine) as session:
        study = session.get(TrainingStudy, fed.study_id)
        rows = session.exec(select(TrainingRound).order_by(TrainingRound.round_index)).all()
        for s in SPOKES:
            assert [m.custody is not None for m in sent[s]] == [True, True]
            records = [check_masked_custody(m, s, keys[s].public, study, row)
                       for m, row in zip(sent[s], rows, strict=True)]
            assert [r.sequence for r in records] == [1, 2]
            assert check_chain([m.custody for m in sent[s]], keys[s].public)[0] == 2
            with pytest.raises(TrainingError, match="custody"):  # replayed into round 1
                check_masked_custody(sent[s][0], s, keys[s].public, study, rows[1])
            with pytest.raises(TrainingError, match="custody"):  # claimed by another spoke
                other = SPOKES[(SPOKES.index(s) + 1) % 3]
                check_masked_custody(sent[s][0], other, keys[other].public, study, rows[0])
            with pytest.raises(TrainingError, match="no custody"):
                check_masked_custody(sent[s][0].model_copy(update={"custody": None}), s,
                                     keys[s].public, study, rows[0])

    # The hub keeps each spoke's records and checks its chain across rounds.
    with Session(fed.engine) as session:
        a, b = SPOKES[0], SPOKES[1]

        def keep(spoke: str, masked: msg.Masked) -> bool:
            row = rows[sent[spoke].index(masked)] if masked in sent[spoke] else rows[1]
            kept = check_masked_custody(masked, spoke, keys[spoke].public, study, row)
            return keep_custody(session, spoke, keys[spoke].public, masked.custody or {}, kept,
                                masked.upload.digest)

        assert [keep(a, m) for m in sent[a]] == [True, True]
        assert keep(a, sent[a][1]) is False  # a redelivery
        # A second record under a kept sequence (a fork), signed by the spoke itself.
        first = record_hash(sent[a][0].custody)
        forked = sent[a][1].model_copy(update={"custody": sign_update_custody(
            keys[a], UpdateCustody.model_validate(
                {**verify_update_custody(
                    sent[a][1].custody, keys[a].public, spoke_id=a, study_id=study.id,
                    round_id=rows[1].round_id, round_index=1, attempt=1,
                    image_digest=study.algorithm, object_digest=sent[a][1].upload.digest,
                    location=sent[a][1].upload.location).model_dump(),
                 "spoke_version": "forked", "previous_record_sha256": first}),
            sent[a][1].upload.digest.removeprefix("sha256:"))})
        with pytest.raises(TrainingError, match="fork"):
            keep(a, forked)
        # A gap: the spoke's second record before the hub kept its first.
        with pytest.raises(TrainingError, match="chain broken at sequence 2"):
            keep(b, sent[b][1])
        assert keep(b, sent[b][0]) and keep(b, sent[b][1])
        session.commit()
        kept = session.exec(select(TrainingCustody).order_by(TrainingCustody.id)).all()
        assert [(k.spoke_id, k.sequence) for k in kept] == [(a, 1), (a, 2), (b, 1), (b, 2)]
        assert [k.object_digest for k in kept[:2]] == [m.upload.digest for m in sent[a]]
        refused = session.exec(select(AuditEvent).where(
            AuditEvent.action == "training.custody_refused")).all()
        assert [(e.detail["spoke"], e.detail["sequence"], e.detail["last_kept"])
                for e in refused] == [(a, 2, 2), (b, 2, 0)]
