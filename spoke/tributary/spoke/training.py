"""The spoke's side of a training round: train, then protect the update itself (clip,
weight, noise, quantise, mask with SecAgg+) and answer the SecAgg+ stages.

The training run is a callable (in production the training image in the sandbox, with the
global model mounted read-only); what it returns is treated as hostile and checked against
the global model's tensors. The spoke keeps its own privacy ledger per study and refuses a
round whose charge would take it past the site's cap. Between stages it keeps a
:class:`RoundSecrets` (its SecAgg+ keys and the update) only sealed; once it has masked,
the masked vector is kept so that a redelivered stage gets the same answer (a fresh noise
draw would be a second, different input, which the hub refuses).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from pydantic import BaseModel, ConfigDict

from tributary.protocol.training import rounds as msg
from tributary.protocol.training.privacy import PrivacyLedger, RoundCharge, may_join
from tributary.protocol.training.secagg import (
    ClientState,
    SecAggClient,
    SecAggRefused,
)
from tributary.protocol.training.update import (
    Quantisation,
    TensorSchema,
    add_gaussian_noise,
    clip_l2,
    flatten,
    quantise,
    schema_of,
)


class TrainingRefused(ValueError):
    """The spoke will not take part (site policy, a hostile update, a wrong round)."""


@dataclass(frozen=True)
class LocalResult:
    """What the training run produced: new parameters, sample count and loss."""

    parameters: Mapping[str, np.ndarray]
    num_examples: int
    loss: float | None = None


def protect_weighted(update: Mapping[str, np.ndarray], schema: TensorSchema, weight: float,
                     clip_bound: float, noise_multiplier: float, quantisation: Quantisation,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """Flatten, clip to ``clip_bound``, scale by ``weight`` (<= 1, so the sensitivity stays
    at most ``2 clip_bound``), add N(0, (z C)^2) and quantise: what is then masked."""
    if not 0 < weight <= 1:
        raise TrainingRefused(f"weight {weight} outside (0, 1]")
    clipped, _norm = clip_l2(flatten(update, schema), clip_bound)
    noised = add_gaussian_noise(clipped * weight, noise_multiplier * clip_bound, rng)
    quantised, _out = quantise(noised, quantisation, rng)
    return quantised


class RoundSecrets(BaseModel):
    """SECRET: what a spoke keeps between the stages of one round (sealed at rest)."""

    model_config = ConfigDict(extra="forbid")

    open: msg.RoundOpen
    client: ClientState
    delta_b64: str
    num_examples: int
    join: msg.Join
    #: num_examples / the round's weight reference, once the keys stage closed.
    weight: float | None = None
    masked: msg.Masked | None = None


class ParticipantState(BaseModel):
    """SECRET: everything a participant keeps across restarts (its journal entry)."""

    model_config = ConfigDict(extra="forbid")

    ledgers: dict[str, PrivacyLedger] = {}
    rounds: dict[str, RoundSecrets] = {}
    finished: dict[str, msg.UnmaskReply] = {}


_AD = b"tributary training participant"


def seal_state(state: ParticipantState, key: bytes) -> bytes:
    """The state encrypted at rest (ChaCha20-Poly1305 under a key kept elsewhere)."""
    nonce = secrets.token_bytes(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, state.model_dump_json().encode(), _AD)


def open_state(blob: bytes, key: bytes) -> ParticipantState:
    try:
        plain = ChaCha20Poly1305(key).decrypt(blob[:12], blob[12:], _AD)
    except InvalidTag as exc:
        raise SecAggRefused("sealed training state fails authentication") from exc
    return ParticipantState.model_validate_json(plain)


@dataclass
class TrainingParticipant:
    """One spoke in training studies. ``train(open_message, global_parameters)`` runs the
    study's algorithm; ``upload(location, data) -> ObjectRef`` writes the masked vector to
    this round's own object; ``caps`` is the site policy (study id -> max epsilon)."""

    me: str
    train: Callable[[msg.RoundOpen, Mapping[str, np.ndarray]], LocalResult]
    upload: Callable[[str, bytes], msg.ObjectRef]
    caps: dict[str, float] = field(default_factory=dict)
    default_cap: float = float("inf")
    ledgers: dict[str, PrivacyLedger] = field(default_factory=dict)
    rounds: dict[str, RoundSecrets] = field(default_factory=dict)
    #: Answers of finished rounds (no secrets): a redelivered unmask request gets the same.
    finished: dict[str, msg.UnmaskReply] = field(default_factory=dict)

    def state(self) -> ParticipantState:
        return ParticipantState(ledgers=self.ledgers, rounds=self.rounds, finished=self.finished)

    def restore(self, state: ParticipantState) -> None:
        self.ledgers, self.rounds, self.finished = state.ledgers, state.rounds, state.finished

    def on_round_open(self, message: msg.RoundOpen,
                      global_parameters: Mapping[str, np.ndarray]) -> msg.Join:
        """Train, keep the update, join with fresh SecAgg+ keys (charging the ledger)."""
        round_id = message.secagg.round_id
        if round_id in self.rounds:  # redelivery: the same answer, no second charge
            return self.rounds[round_id].join
        charge = RoundCharge(noise_multiplier=message.protection.noise_multiplier)
        ledger = self.ledgers.setdefault(message.study_id,
                                         PrivacyLedger(delta=message.protection.delta))
        cap = self.caps.get(message.study_id, self.default_cap)
        if not may_join(ledger, charge, cap):
            raise TrainingRefused(
                f"round {round_id} would take study {message.study_id} to epsilon "
                f"{ledger.epsilon_if(charge):.4f}, over this site's cap {cap}")
        schema = schema_of(global_parameters)
        result = self.train(message, global_parameters)
        if result.num_examples < 1:
            raise TrainingRefused("the training run reported no examples")
        new = flatten(result.parameters, schema)  # refuses foreign or misshaped tensors
        delta = new - flatten(global_parameters, schema)
        client, advert = SecAggClient.start(message.secagg, self.me)
        ledger.record(charge)  # charged once it releases anything, even if it drops later
        join = msg.Join(advert=advert, num_examples=result.num_examples, loss=result.loss)
        self.rounds[round_id] = RoundSecrets(
            open=message, client=client.state, num_examples=result.num_examples, join=join,
            delta_b64=base64.b64encode(delta.astype("<f8").tobytes()).decode())
        return join

    def _round(self, round_id: str) -> RoundSecrets:
        if round_id not in self.rounds:
            raise TrainingRefused(f"no open round {round_id}")
        return self.rounds[round_id]

    def on_keys(self, message: msg.Keys) -> msg.Shares:
        kept = self._round(message.keys.round_id)
        client = SecAggClient(kept.client)
        bundle = client.share_keys(message.keys)
        kept.client = client.state
        weight = kept.num_examples / message.weight_reference
        if weight > 1:
            raise TrainingRefused("weight reference below this site's own sample count")
        kept.weight = weight
        return msg.Shares(bundle=bundle)

    def on_delivery(self, message: msg.Delivery) -> msg.Masked:
        round_id = message.delivery.round_id
        kept = self._round(round_id)
        if kept.masked is not None:  # redelivery: the same masked input, not a new draw
            return kept.masked
        if kept.weight is None:
            raise TrainingRefused(f"shares for round {round_id} before its keys")
        client = SecAggClient(kept.client)
        client.receive_shares(message.delivery)
        protection = kept.open.protection
        delta = np.frombuffer(base64.b64decode(kept.delta_b64), dtype="<f8")
        quantised = protect_weighted({"update": delta}, schema_of({"update": delta}), kept.weight,
                                     protection.clip_bound, protection.noise_multiplier,
                                     protection.quantisation)
        masked, vector = client.mask(quantised.astype(np.uint32))
        data = vector.astype("<u4").tobytes()
        ref = self.upload(kept.open.upload, data)
        kept.client = client.state
        kept.masked = msg.Masked(masked=masked, upload=ref)
        return kept.masked

    def on_consistency(self, message: msg.Consistency) -> msg.Signature:
        kept = self._round(message.request.round_id)
        client = SecAggClient(kept.client)
        signature = client.sign_survivors(message.request)
        kept.client = client.state
        return msg.Signature(signature=signature)

    def on_unmask(self, message: msg.Unmask) -> msg.UnmaskReply:
        round_id = message.request.round_id
        if round_id in self.finished:
            return self.finished[round_id]
        kept = self._round(round_id)
        client = SecAggClient(kept.client)
        response = client.unmask(message.request)
        del self.rounds[round_id]  # the round's secrets are no longer needed
        self.finished[round_id] = msg.UnmaskReply(response=response)
        return self.finished[round_id]

