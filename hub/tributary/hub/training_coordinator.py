"""Runs training studies over the broker and the object store: opens rounds, routes the
SecAgg+ stages between spokes (every message signed), closes stages when everyone answered
or at the deadline, sums the masked vectors it reads from the store, and writes each next
global model to the store, content-addressed and signed. The round state itself lives in
the database (:mod:`tributary.hub.services.training`); this module is its I/O."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping

import numpy as np
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from tributary.hub import training_checks
from tributary.hub.models import TrainingRound, TrainingStudy
from tributary.hub.services import training
from tributary.protocol.broker import Delivery, StompClient
from tributary.protocol.messages import ProtocolError
from tributary.protocol.objects import ObjectStore, global_model_key, round_update_key
from tributary.protocol.signing import PublicKey, SigningKey
from tributary.protocol.training import rounds as msg
from tributary.protocol.training.secagg import SecAggError, vector_from_bytes
from tributary.protocol.training.tensors import Tensors, decode_tensors, encode_tensors
from tributary.protocol.training.transport import (
    hub_training_queue,
    open_message,
    seal_message,
    sign_model,
    spoke_training_queue,
)
from tributary.protocol.training.update import flatten, schema_of, unflatten

log = logging.getLogger(__name__)


class TrainingCoordinator:
    def __init__(self, engine: Engine, broker: StompClient, store: ObjectStore,
                 key: SigningKey, spoke_keys: Mapping[str, PublicKey], federation: str) -> None:
        self.engine, self.broker, self.store, self.key = engine, broker, store, key
        self.spoke_keys = dict(spoke_keys)
        self.federation = federation
        #: One writer of round rows at a time: the broker's thread and the round loop.
        self._lock = threading.Lock()
        self.refused: list[str] = []
        #: Study id -> the global model of each round, in order (the first: initial).
        self.history: dict[str, list[Tensors]] = {}

    def start(self) -> None:
        self.broker.subscribe(hub_training_queue(self.federation), self._on_message)

    # --- models ----------------------------------------------------------------------

    def put_model(self, round_index: int, study_id: str, params: Tensors) -> msg.ObjectRef:
        data = encode_tensors(params)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        key = global_model_key(round_index, f"{study_id}-{digest[7:23]}.safetensors")
        self.store.put(key, data)
        return msg.ObjectRef(digest=digest, location=key, size=len(data))

    def get_model(self, ref: msg.ObjectRef) -> Tensors:
        data = self.store.get(ref.location)
        if "sha256:" + hashlib.sha256(data).hexdigest() != ref.digest:
            raise ProtocolError(f"global model at {ref.location} does not match its digest")
        return decode_tensors(data)

    # --- messages from spokes --------------------------------------------------------

    def _on_message(self, delivery: Delivery) -> None:
        try:
            sender, message = open_message(delivery.body, self.spoke_keys,
                                           msg.decode_training_from_spoke)
            self._apply(sender, message)
        except (ProtocolError, SecAggError, training.TrainingError, KeyError) as exc:
            # Hostile or stale: recorded and dropped, never retried forever.
            log.warning("training message refused: %s", exc)
            self.refused.append(str(exc))
        self.broker.ack(delivery)

    def _apply(self, sender: str, message: msg.TrainingFromSpoke) -> None:
        if isinstance(message, msg.Refusal):  # audited; the round goes on without it
            with self._lock, Session(self.engine) as session:
                training_checks.record_refusal(session, sender, message)
                session.commit()
            return
        inner = {msg.Join: lambda m: m.advert, msg.Shares: lambda m: m.bundle,
                 msg.Masked: lambda m: m.masked, msg.Signature: lambda m: m.signature,
                 msg.UnmaskReply: lambda m: m.response}[type(message)](message)
        with self._lock, Session(self.engine) as session:
            row = session.exec(select(TrainingRound).where(
                TrainingRound.round_id == inner.round_id)).first()
            if row is None:
                raise training.TrainingError(f"no round {inner.round_id}")
            if isinstance(message, msg.Masked):
                expected = round_update_key(sender, row.round_index, f"{row.round_id}.masked")
                if message.upload.location != expected:
                    raise training.TrainingError(
                        f"{sender} uploaded to {message.upload.location}, not its own object")
                training_checks.check_masked_custody(
                    message, sender, self.spoke_keys[sender],
                    session.get(TrainingStudy, row.study_id), row)
            training.receive(session, row, message, sender)
            session.commit()

    # --- the round loop --------------------------------------------------------------

    def _send(self, receiver: str, message: msg.TrainingFromHub) -> None:
        self.broker.publish(spoke_training_queue(receiver, self.federation),
                            seal_message(self.key, message))

    def run(self, study_id: str, initial: Tensors, poll_s: float = 0.2,
            timeout_s: float = 3600.0) -> tuple[TrainingStudy, Tensors]:
        """Drive ``study_id`` from its first round to its end; returns the final study and
        its last global model."""
        params = {k: np.asarray(v) for k, v in initial.items()}
        schema = schema_of(params)
        index, attempt = 0, 1
        ref = self.put_model(0, study_id, params)
        self.history[study_id] = [params]
        with self._lock, Session(self.engine) as session:
            study = session.get(TrainingStudy, study_id)
            study.global_model = ref.digest
            session.add(study)
            session.commit()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock, Session(self.engine) as session:
                study = session.get(TrainingStudy, study_id)
                row = training.open_round(session, study, schema.size, index, attempt)
                session.commit()
                if row is None:
                    session.refresh(study)
                    return study, params
                signature = sign_model(self.key, ref.digest)
                opens = [training.round_open_message(
                    study, row, ref, signature,
                    lambda s, r=row: round_update_key(s, r.round_index, f"{r.round_id}.masked"),
                    s) for s in row.participants]
                round_id = row.round_id
            for spoke, message in zip(row.participants, opens, strict=True):
                self._send(spoke, message)
            mean = self._drive(round_id, schema.size, poll_s, deadline)
            with self._lock, Session(self.engine) as session:
                study = session.get(TrainingStudy, study_id)
                row = session.exec(select(TrainingRound).where(
                    TrainingRound.round_id == round_id)).one()
                if mean is None:  # retried (or the study failed)
                    attempt += 1
                    if study.state != "running":
                        return study, params
                    continue
                vector = flatten(params, schema) + mean
                params = unflatten(vector, schema)
                index, attempt = index + 1, 1
                ref = self.put_model(index, study_id, params)
                self.history[study_id].append(params)
                training.set_global_model(session, study, row, ref.digest)
                session.commit()
        raise TimeoutError(f"study {study_id} did not end within {timeout_s} s")

    def _drive(self, round_id: str, length: int, poll_s: float,
               deadline: float) -> np.ndarray | None:
        """Close stages as they become ready until the round is aggregated or retried."""
        while time.monotonic() < deadline:
            with self._lock, Session(self.engine) as session:
                row = session.exec(select(TrainingRound).where(
                    TrainingRound.round_id == round_id)).one()
                study = session.get(TrainingStudy, row.study_id)
                out, mean = training.advance(
                    session, study, row,
                    lambda location: vector_from_bytes(self.store.get(location), 32, length),
                    length)
                session.commit()
                stage = row.stage
            for receiver, message in out:
                self._send(receiver, message)
            if stage in ("aggregated", "retried", "failed"):
                return mean
            time.sleep(poll_s)
        raise TimeoutError(f"round {round_id} did not end in time")
