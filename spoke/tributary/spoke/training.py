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
import hashlib
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from pydantic import BaseModel, ConfigDict

from tributary.protocol.signing import SigningKey
from tributary.protocol.training import rounds as msg
from tributary.protocol.training.custody import (
    GENESIS,
    UpdateCustody,
    record_hash,
    sign_update_custody,
)
from tributary.protocol.training.privacy import PrivacyLedger, RoundCharge, may_join
from tributary.protocol.training.secagg import (
    ClientState,
    MaskedInput,
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
    """The spoke will not take part (site policy, a hostile update, a wrong round);
    ``reason`` is the code its signed refusal gives (:class:`rounds.Refusal`)."""

    def __init__(self, detail: str, reason: msg.RefusalReason = "protocol") -> None:
        super().__init__(detail)
        self.reason: msg.RefusalReason = reason


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
    #: The update in clear (little-endian float64), when it is kept in the state itself;
    #: with a spool and its key it is kept there, sealed, and only its digest is here.
    delta_b64: str | None = None
    delta_sha256: str | None = None
    num_examples: int
    join: msg.Join
    #: num_examples / the round's weight reference, once the keys stage closed.
    weight: float | None = None
    #: The masked input, journaled (with its vector spooled to disk) before the upload, so
    #: a crash between upload and answer re-sends the same vector, never a new noise draw.
    pending: MaskedInput | None = None
    masked: msg.Masked | None = None


class ParticipantState(BaseModel):
    """SECRET: everything a participant keeps across restarts (its journal entry)."""

    model_config = ConfigDict(extra="forbid")

    ledgers: dict[str, PrivacyLedger] = {}
    rounds: dict[str, RoundSecrets] = {}
    finished: dict[str, msg.UnmaskReply] = {}
    #: Head of the spoke's training custody chain: last sequence and its record's hash.
    chain_sequence: int = 0
    chain_head: str = GENESIS


_AD = b"tributary training participant"
_UPDATE_AD = b"tributary training update\0"


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all, on disk before this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
    this round's own object; ``caps`` is the site policy (study id -> max epsilon).

    With ``key``, each masked update is bound to a signed custody record (chained);
    with ``spool`` and ``persist``, the masked vector is written to ``spool`` and the state
    persisted before the upload (see :attr:`RoundSecrets.pending`). With ``spool`` and
    ``spool_key``, the update itself waits for the masking stage in ``spool``, sealed, not
    in the state: the state is journaled after every message, and an update of 10^7
    parameters rewritten each time would be most of a spoke's cost in a round."""

    me: str
    train: Callable[[msg.RoundOpen, Mapping[str, np.ndarray]], LocalResult]
    upload: Callable[[str, bytes], msg.ObjectRef]
    caps: dict[str, float] = field(default_factory=dict)
    default_cap: float = float("inf")
    ledgers: dict[str, PrivacyLedger] = field(default_factory=dict)
    rounds: dict[str, RoundSecrets] = field(default_factory=dict)
    #: Answers of finished rounds (no secrets): a redelivered unmask request gets the same.
    finished: dict[str, msg.UnmaskReply] = field(default_factory=dict)
    key: SigningKey | None = None
    spool: Path | None = None
    persist: Callable[[], None] | None = None
    spool_key: bytes | None = None
    version: str = "unknown"
    #: Site policy: send the run's loss with ``Join`` (in clear, outside the DP guarantee).
    release_loss: bool = False
    chain_sequence: int = 0
    chain_head: str = GENESIS

    def state(self) -> ParticipantState:
        return ParticipantState(ledgers=self.ledgers, rounds=self.rounds, finished=self.finished,
                                chain_sequence=self.chain_sequence, chain_head=self.chain_head)

    def restore(self, state: ParticipantState) -> None:
        self.ledgers, self.rounds, self.finished = state.ledgers, state.rounds, state.finished
        self.chain_sequence, self.chain_head = state.chain_sequence, state.chain_head

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
                f"{ledger.epsilon_if(charge):.4f}, over this site's cap {cap}", "epsilon_cap")
        schema = schema_of(global_parameters)
        result = self.train(message, global_parameters)
        if result.num_examples < 1:
            raise TrainingRefused("the training run reported no examples")
        new = flatten(result.parameters, schema)  # refuses foreign or misshaped tensors
        delta = new - flatten(global_parameters, schema)
        client, advert = SecAggClient.start(message.secagg, self.me)
        ledger.record(charge)  # charged once it releases anything, even if it drops later
        join = msg.Join(advert=advert, num_examples=result.num_examples,
                        loss=result.loss if self.release_loss else None)
        raw = delta.astype("<f8").tobytes()
        if self.spool is not None and self.spool_key is not None:
            self._seal_delta(round_id, raw)  # before the state that names it is journaled
            kept = {"delta_sha256": hashlib.sha256(raw).hexdigest()}
        else:
            kept = {"delta_b64": base64.b64encode(raw).decode()}
        self.rounds[round_id] = RoundSecrets(
            open=message, client=client.state, num_examples=result.num_examples, join=join,
            **kept)
        return join

    def _delta_path(self, round_id: str) -> Path:
        assert self.spool is not None
        return self.spool / (hashlib.sha256(round_id.encode()).hexdigest()[:32] + ".update")

    def _seal_delta(self, round_id: str, raw: bytes) -> None:
        assert self.spool_key is not None
        nonce = secrets.token_bytes(12)
        sealed = nonce + ChaCha20Poly1305(self.spool_key).encrypt(
            nonce, raw, _UPDATE_AD + round_id.encode())
        _write_durably(self._delta_path(round_id), sealed)

    def _delta(self, round_id: str, kept: RoundSecrets) -> np.ndarray:
        """The round's update, from the state or unsealed from the spool (checked against
        the digest the state kept); refused if it is gone or not the one trained."""
        if kept.delta_b64 is not None:
            return np.frombuffer(base64.b64decode(kept.delta_b64), dtype="<f8")
        path = self._delta_path(round_id) if self.spool is not None else None
        raw = None
        if path is not None and path.exists() and self.spool_key is not None:
            blob = path.read_bytes()
            try:
                raw = ChaCha20Poly1305(self.spool_key).decrypt(
                    blob[:12], blob[12:], _UPDATE_AD + round_id.encode())
            except InvalidTag:
                raw = None
        if raw is None or hashlib.sha256(raw).hexdigest() != kept.delta_sha256:
            raise TrainingRefused(f"the update of round {round_id} was lost or altered; this "
                                  "spoke does not send another one")
        return np.frombuffer(raw, dtype="<f8")

    def _forget_delta(self, round_id: str) -> None:
        if self.spool is not None:
            self._delta_path(round_id).unlink(missing_ok=True)

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
        if kept.pending is not None:  # masked before a crash: the very same vector again
            data = self._spooled(round_id, kept.pending)
        else:
            client = SecAggClient(kept.client)
            client.receive_shares(message.delivery)
            protection = kept.open.protection
            delta = self._delta(round_id, kept)
            quantised = protect_weighted({"update": delta}, schema_of({"update": delta}),
                                         kept.weight, protection.clip_bound,
                                         protection.noise_multiplier, protection.quantisation)
            masked, vector = client.mask(quantised.astype(np.uint32))
            data = vector.astype("<u4").tobytes()
            kept.client = client.state
            kept.pending = masked
            if self.spool is not None and self.persist is not None:
                self._spool_write(round_id, data)
                self.persist()
                self._forget_delta(round_id)  # the journal names the masked vector now
        ref = self.upload(kept.open.upload, data)
        kept.masked = msg.Masked(masked=kept.pending, upload=ref, custody=self._custody(kept, ref))
        if self.spool is not None:
            self._spool_path(round_id).unlink(missing_ok=True)
        return kept.masked

    def _custody(self, kept: RoundSecrets, ref: msg.ObjectRef) -> dict | None:
        """The signed record binding ``ref`` to this round, the next in the chain."""
        if self.key is None:
            return None
        record = UpdateCustody(
            spoke_id=self.me, study_id=kept.open.study_id, round_index=kept.open.round_index,
            attempt=kept.open.attempt, round_id=kept.open.secagg.round_id,
            image_digest=kept.open.algorithm, global_model_digest=kept.open.global_model.digest,
            location=ref.location, size=ref.size, num_examples=kept.num_examples,
            sequence=self.chain_sequence + 1, previous_record_sha256=self.chain_head,
            spoke_version=self.version, created_at=datetime.now(UTC))
        envelope = sign_update_custody(self.key, record, ref.digest.removeprefix("sha256:"))
        self.chain_sequence, self.chain_head = record.sequence, record_hash(envelope)
        return envelope

    def _spool_path(self, round_id: str) -> Path:
        assert self.spool is not None
        return self.spool / (hashlib.sha256(round_id.encode()).hexdigest()[:32] + ".masked")

    def _spool_write(self, round_id: str, data: bytes) -> None:
        _write_durably(self._spool_path(round_id), data)

    def _spooled(self, round_id: str, pending: MaskedInput) -> bytes:
        """The vector masked before a crash; refused if it is gone or not what was masked
        (then the round goes on without this spoke: no second draw is ever sent)."""
        path = self._spool_path(round_id) if self.spool is not None else None
        data = path.read_bytes() if path is not None and path.exists() else None
        if data is None or hashlib.sha256(data).hexdigest() != pending.sha256:
            raise TrainingRefused(f"the masked vector of round {round_id} was lost; this "
                                  "spoke does not mask its update twice")
        return data

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
        self._forget_delta(round_id)
        self.finished[round_id] = msg.UnmaskReply(response=response)
        return self.finished[round_id]

