"""A training round's close: unmask the SecAgg+ sum, dequantise it, apply the study's
server optimiser (FedAvg: add the mean update) and write the next global model to the
object store, committed with the round's aggregation.

It is the body of the hub's Celery task ``aggregate_training_round``
(:mod:`tributary.hub.worker`), and what the round loop calls itself when there is no
Celery broker: the close is the heaviest step of a round (it reads every survivor's masked
vector and the model), and with a broker it runs on the aggregation workers instead of
the loop. It is idempotent: a round already aggregated gives back its model and changes
nothing, so a task delivered twice, or run again after a worker died, never makes a second
round nor charges a spoke twice. The round's row is locked for the close (``FOR UPDATE``
on PostgreSQL) so that a second run waits and then finds it aggregated."""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlmodel import Session, select

from tributary.hub.models import TrainingRound, TrainingStudy
from tributary.hub.services import training, training_optimiser
from tributary.hub.services.training_optimiser import Store
from tributary.protocol.training.rounds import ObjectRef
from tributary.protocol.training.secagg import vector_from_bytes
from tributary.protocol.training.tensors import Tensors, decode_tensors
from tributary.protocol.training.update import schema_of


def global_model_in(store: Store, study: TrainingStudy, row: TrainingRound) -> Tensors:
    """The model going into ``row``, read by its digest and refused if it differs."""
    if row.global_model_in is None:
        raise training.TrainingError(f"round {row.round_id} has no global model")
    location = training.model_location(study.id, row.round_index, row.global_model_in)
    data = store.get(location)
    if "sha256:" + hashlib.sha256(data).hexdigest() != row.global_model_in:
        raise training.TrainingError(f"global model at {location} does not match its digest")
    return decode_tensors(data)


def close_round(session: Session, store: Store, round_id: str,
                now: datetime | None = None) -> tuple[ObjectRef, Tensors] | None:
    """Aggregate ``round_id`` if its unmask stage may close, and commit. Returns the next
    global model (its reference and tensors); the recorded one if the round was already
    aggregated; None if the round is not ready or the close ended it as retried."""
    row = session.exec(select(TrainingRound).where(TrainingRound.round_id == round_id)
                       .with_for_update()).first()
    if row is None:
        raise training.TrainingError(f"no round {round_id}")
    study = session.get(TrainingStudy, row.study_id)
    if study is None:
        raise training.TrainingError(f"no training study {row.study_id}")
    if row.stage == "aggregated" and row.global_model_out:
        location = training.model_location(study.id, row.round_index + 1,
                                           row.global_model_out)
        data = store.get(location)
        return (ObjectRef(digest=row.global_model_out, location=location, size=len(data)),
                decode_tensors(data))
    if row.stage != "unmask" or study.state != "running" or not training.ready(row, now):
        session.rollback()
        return None
    params = global_model_in(store, study, row)
    size = schema_of(params).size
    _, mean = training.advance(session, study, row,
                               lambda location: vector_from_bytes(store.get(location), 32,
                                                                  size), size, now)
    new = None
    if mean is not None:
        new = training_optimiser.next_model(session, store, study, row, params, mean)
    session.commit()
    return new
