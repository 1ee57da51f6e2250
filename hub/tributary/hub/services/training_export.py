"""A training study's models and their provenance, as the hub hands them out: built from
the study's rows (read only: the round state is the coordinator's), every global model read
back from the object store and refused unless its bytes still match the digest the rounds
recorded, and signed by the hub (the model's digest, and the provenance document)."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from tributary.hub.models import TrainingRound, TrainingStudy
from tributary.hub.services import access_grants
from tributary.hub.services.training import model_location, rounds_of
from tributary.protocol.objects import ObjectStore
from tributary.protocol.signing import SigningKey
from tributary.protocol.training.privacy import PrivacyLedger, RoundCharge, epsilon
from tributary.protocol.training.provenance import (
    ModelRecord,
    RoundRecord,
    StudySettings,
    TrainingProvenance,
    sha256_digest,
    sign_provenance,
)
from tributary.protocol.training.transport import sign_model


class ModelUnavailable(LookupError):
    """No such model (the study has not reached that round)."""


class ModelTampered(ValueError):
    """The object in the store is not the model the rounds recorded."""


def _survivors(row: TrainingRound) -> list[str]:
    state = row.secagg or {}
    return sorted(state.get("survivors") or state.get("masked") or {})


def round_record(study: TrainingStudy, row: TrainingRound) -> RoundRecord:
    charged = row.stage == "aggregated"
    return RoundRecord(
        round=row.round_index, attempt=row.attempt, outcome=row.stage,
        outcome_reason=row.outcome_reason, targeted=sorted(row.participants),
        participants=sorted(row.num_examples), num_examples=dict(row.num_examples),
        survivors=_survivors(row), clip_bound=study.clip_bound,
        noise_multiplier=study.noise_multiplier, delta=study.delta,
        epsilon_round=(epsilon([RoundCharge(noise_multiplier=study.noise_multiplier)],
                               study.delta) if charged else None),
        epsilon_cumulative=row.epsilon_cumulative, global_model_in=row.global_model_in,
        global_model_out=row.global_model_out, mean_loss=row.mean_loss,
        opened_at=row.opened_at, closed_at=row.closed_at)


def model_digests(rows: list[TrainingRound]) -> list[str]:
    """The study's global models in order: the first round's input, then each aggregated
    round's output."""
    aggregated = [r for r in rows if r.stage == "aggregated" and r.global_model_out]
    first = next((r.global_model_in for r in rows if r.global_model_in), None)
    return ([first] if first else []) + [r.global_model_out for r in aggregated
                                          if r.global_model_out]


def provenance(session: Session, study: TrainingStudy, key: SigningKey) -> TrainingProvenance:
    """The study's provenance from its rows, its models signed with the hub's ``key``."""
    rows = rounds_of(session, study.id)
    ledgers = {s: PrivacyLedger.model_validate(v) for s, v in sorted((study.ledgers or {}).items())}
    models = [ModelRecord(index=i, digest=d, location=model_location(study.id, i, d),
                          signature=sign_model(key, d))
              for i, d in enumerate(model_digests(rows))]
    return TrainingProvenance(
        study=StudySettings(
            id=study.id, name=study.name, algorithm=study.algorithm,
            image_digest=study.algorithm.rpartition("@")[2], strategy=study.strategy,
            proximal_mu=study.proximal_mu, server_optimiser=study.server_optimiser,
            rounds=study.rounds,
            min_participants=study.min_participants, round_deadline_s=study.round_deadline_s,
            max_attempts=study.max_attempts, clip_bound=study.clip_bound,
            noise_multiplier=study.noise_multiplier, epsilon_budget=study.epsilon_budget,
            delta=study.delta, spokes=list(study.spokes), created_by=study.created_by,
            created_at=study.created_at),
        state=study.state, stop_reason=study.stop_reason, finished_at=study.finished_at,
        epsilon_spent=max((ledger.epsilon() for ledger in ledgers.values()), default=0.0),
        ledgers=ledgers, rounds=[round_record(study, r) for r in rows], models=models,
        hub_keyid=key.keyid,
        access_request=access_grants.bundle_record(session, study.access_request_id))


def pick(prov: TrainingProvenance, index: int | None) -> ModelRecord:
    """Model ``index`` (None: the final one)."""
    if not prov.models:
        raise ModelUnavailable(f"study {prov.study.id} has no global model yet")
    if index is None:
        return prov.models[-1]
    if not 0 <= index < len(prov.models):
        raise ModelUnavailable(f"study {prov.study.id} has models 0 to {len(prov.models) - 1}")
    return prov.models[index]


def read_model(store: ObjectStore, record: ModelRecord) -> bytes:
    """The model's bytes from the store, refused unless they match its recorded digest."""
    data = store.get(record.location)
    if sha256_digest(data) != record.digest:
        raise ModelTampered(f"the object {record.location} is not global model "
                            f"{record.index} ({record.digest}): refused")
    return data


def signed(prov: TrainingProvenance, key: SigningKey) -> dict[str, Any]:
    """The provenance as the hub's DSSE envelope."""
    return sign_provenance(key, prov)
