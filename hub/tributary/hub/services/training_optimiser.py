"""A training study's server optimiser (FedAdam, FedYogi, FedAdagrad; FedAvg adds the
aggregate as it is) and its durable state.

The moments are as large as the model, so they live in the object store like the global
models, content-addressed beside them (round r's moments at index r + 1, as its model),
and each aggregated round records their digest with its next model, in the same commit.
The state going into a round is therefore derived from the database alone: a hub restarted
mid-study resumes with the same moments, and a round aggregated again after a crash
(before its commit) steps from the same state to the same model."""

from __future__ import annotations

import hashlib
import math
from typing import Protocol

import numpy as np
from sqlmodel import Session

from tributary.hub.models import TrainingRound, TrainingStudy
from tributary.hub.services import audit
from tributary.hub.services.server_optimisers import OptimiserState, ServerOptimiser, step
from tributary.protocol.objects import global_model_key
from tributary.protocol.training.rounds import ObjectRef
from tributary.protocol.training.tensors import Tensors, decode_tensors, encode_tensors
from tributary.protocol.training.update import flatten, schema_of, unflatten


class Store(Protocol):
    """The object store as this module uses it (``ObjectStore``)."""

    def put(self, key: str, data: bytes) -> object: ...

    def get(self, key: str) -> bytes: ...


class OptimiserStateError(ValueError):
    """A stored optimiser state that does not match its digest or the model."""


def optimiser_of(study: TrainingStudy) -> ServerOptimiser:
    """The study's optimiser (FedAvg's plain addition when it has none)."""
    if study.server_optimiser:
        return ServerOptimiser.model_validate(study.server_optimiser)
    return ServerOptimiser(kind="fedavg")


def local_strategy(study: TrainingStudy) -> str:
    """What the spokes run: FedProx's proximal term or plain local training."""
    return "fedprox" if study.strategy == "fedprox" else "fedavg"


def state_location(study_id: str, model_index: int, digest: str) -> str:
    """Where the moments that go with global model ``model_index`` live in the store."""
    return global_model_key(model_index, f"{study_id}-{digest.removeprefix('sha256:')[:16]}"
                                         ".optimiser.safetensors")


def encode_state(state: OptimiserState) -> bytes:
    tensors = {"steps": np.array([state.steps], dtype=np.int64)}
    if state.m is not None and state.v is not None:
        tensors |= {"m": np.asarray(state.m, np.float64), "v": np.asarray(state.v, np.float64)}
    return encode_tensors(tensors)


def decode_state(data: bytes, digest: str, size: int) -> OptimiserState:
    """The state from the store's bytes, refused unless they match ``digest`` and hold
    finite float64 moments of the model's ``size``."""
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise OptimiserStateError(f"optimiser state does not match its digest {digest}")
    try:
        tensors = decode_tensors(data)
    except ValueError as exc:
        raise OptimiserStateError(f"optimiser state {digest} is unreadable: {exc}") from None
    steps = tensors.get("steps")
    if steps is None or steps.shape != (1,) or steps.dtype != np.int64 or steps[0] < 0:
        raise OptimiserStateError(f"optimiser state {digest} has no valid step count")
    moments = {k: tensors[k] for k in ("m", "v") if k in tensors}
    if set(tensors) - {"steps", "m", "v"} or len(moments) == 1:
        raise OptimiserStateError(f"optimiser state {digest} holds {sorted(tensors)}")
    for name, array in moments.items():
        if array.dtype != np.float64 or array.shape != (size,) \
                or not np.all(np.isfinite(array)):
            raise OptimiserStateError(f"optimiser state {digest}: {name} is not {size} "
                                      "finite float64 values")
    return OptimiserState(steps=int(steps[0]), m=moments.get("m"), v=moments.get("v"))


def state_into(session: Session, study: TrainingStudy,
               round_index: int) -> tuple[int, str] | None:
    """(model index, digest) of the moments going into ``round_index``, those recorded by
    the last aggregated round before it; None before any (the optimiser's start)."""
    from tributary.hub.services.training import rounds_of  # training imports this module

    done = [r for r in rounds_of(session, study.id)
            if r.stage == "aggregated" and r.round_index < round_index
            and r.optimiser_state_out]
    if not done:
        return None
    return done[-1].round_index + 1, done[-1].optimiser_state_out or ""


def record_state(session: Session, row: TrainingRound, digest: str,
                 state: OptimiserState) -> None:
    """Record the moments after ``row`` (written by the caller to the store)."""
    row.optimiser_state_out = digest
    session.add(row)
    norm = float(np.linalg.norm(state.m)) if state.m is not None else 0.0
    audit.record(session, "hub:training", "training.optimiser_state", row.round_id,
                 digest=digest, steps=state.steps,
                 first_moment_norm=norm if math.isfinite(norm) else None)


def state_going_into(session: Session, store: Store, study: TrainingStudy,
                     round_index: int, size: int) -> OptimiserState:
    """The moments going into ``round_index``, read from the store by the digest the
    previous aggregated round recorded (the optimiser's start before any)."""
    found = state_into(session, study, round_index)
    if found is None:
        return OptimiserState()
    index, digest = found
    return decode_state(store.get(state_location(study.id, index, digest)), digest, size)


def next_model(session: Session, store: Store, study: TrainingStudy, row: TrainingRound,
               params: Tensors, mean: np.ndarray) -> tuple[ObjectRef, Tensors]:
    """Apply the study's server optimiser (FedAvg: add ``mean``, the round's mean update)
    to the global model ``params``, write the next model and the optimiser's moments to the
    store and record both on ``row``, to be committed with the round's aggregation. Both
    derive from committed rows alone, so a round aggregated again after a crash steps from
    the same state to the same digests."""
    from tributary.hub.services.training import model_location, set_global_model

    schema = schema_of(params)
    optimiser = optimiser_of(study)
    state = state_going_into(session, store, study, row.round_index, schema.size)
    weights, state = step(optimiser, flatten(params, schema), mean, state)
    new = unflatten(weights, schema)
    data = encode_tensors(new)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    location = model_location(study.id, row.round_index + 1, digest)
    store.put(location, data)
    if optimiser.kind != "fedavg":
        moments = encode_state(state)
        moments_digest = "sha256:" + hashlib.sha256(moments).hexdigest()
        store.put(state_location(study.id, row.round_index + 1, moments_digest), moments)
        record_state(session, row, moments_digest, state)
    set_global_model(session, study, row, digest)
    return ObjectRef(digest=digest, location=location, size=len(data)), decode_tensors(data)
