"""The spoke's training agent: takes the hub's signed round messages from its training
queue, reads the signed global model from the object store (checked against its digest),
runs the approved training image in the sandbox (no network, global model read-only),
protects and masks the update (:mod:`tributary.spoke.training`), writes the masked vector
to this round's own object and answers each stage, signed.

Exactly once across restarts: after every message the participant's state is written,
sealed, to its journal file (atomically) before the message is acknowledged; a message
redelivered after a crash finds the state it left and gets the same answer. The masked
vector is spooled and the state written before the vector is uploaded, so a crash between
upload and answer re-sends the same vector.

A round the spoke will not take part in (image not trusted, epsilon cap, a failed run) is
answered with a signed :class:`~tributary.protocol.training.rounds.Refusal` giving the
reason; every refusal and every released update is audited when an ``audit`` is given.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tributary.protocol.broker import Delivery, StompClient
from tributary.protocol.messages import ProtocolError
from tributary.protocol.objects import ObjectStore
from tributary.protocol.signing import PublicKey, SigningKey
from tributary.protocol.training import rounds as msg
from tributary.protocol.training.secagg import SecAggError
from tributary.protocol.training.tensors import decode_tensors
from tributary.protocol.training.transport import (
    hub_training_queue,
    open_message,
    seal_message,
    spoke_training_queue,
    verify_model,
)
from tributary.protocol.training.update import UpdateError
from tributary.spoke.training import (
    LocalResult,
    TrainingParticipant,
    TrainingRefused,
    open_state,
    seal_state,
)

log = logging.getLogger(__name__)


@dataclass
class DockerTrainer:
    """Runs the one approved training image, by digest, on the site's cases."""

    image: str
    site: Any  # tributary_algorithm.tools.localtrain.TrainingSite
    run_options: Mapping[str, Any]

    def __call__(self, message: msg.RoundOpen, params: Mapping[str, np.ndarray]) -> LocalResult:
        from tributary_algorithm.tools.localtrain import run_training_task
        from tributary_algorithm.training import RoundConfig

        if message.algorithm != self.image:
            raise TrainingRefused(f"study asks for {message.algorithm}, this site approved "
                                  f"{self.image}")
        config = RoundConfig(round=message.round_index + 1, task="fit",
                             study_id=message.study_id, strategy=message.strategy,
                             proximal_mu=message.proximal_mu,
                             seed=int.from_bytes(os.urandom(4), "big"))
        result = run_training_task(self.image, self.site, config, dict(params),
                                   **self.run_options)
        if not result.ok or result.parameters is None or result.output is None:
            raise TrainingRefused(f"training run failed: {result.problem}")
        return LocalResult(result.parameters, int(result.output["num_examples"]),
                           result.output.get("loss"))


def load_or_create_secret(path: Path) -> bytes:
    """A 32-byte key kept in its own file (owner-only), made on first use: the training
    journal's sealing key, apart from the journal it seals."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(32))
            handle.flush()
            os.fsync(handle.fileno())
    key = path.read_bytes()
    if len(key) != 32:
        raise ValueError(f"{path} does not hold a 32-byte key")
    return key


Trainer = Callable[[msg.RoundOpen, Mapping[str, np.ndarray]], LocalResult]


def _no_audit(action: str, target: str, **detail: Any) -> None:
    del action, target, detail


class TrainingAgent:
    def __init__(self, spoke_id: str, broker: StompClient, store: ObjectStore,
                 key: SigningKey, hub_key: PublicKey, trainer: Trainer,
                 federation: str, journal: Path, journal_key: bytes,
                 caps: Mapping[str, float] | None = None, default_cap: float = float("inf"),
                 audit: Callable[..., None] = _no_audit, version: str = "unknown",
                 release_loss: bool = False) -> None:
        self.spoke_id, self.broker, self.store, self.key = spoke_id, broker, store, key
        self.hub_key, self.federation = hub_key, federation
        self.journal, self.journal_key = journal, journal_key
        self.audit = audit
        self.participant = TrainingParticipant(
            me=spoke_id, train=trainer, upload=self._upload, caps=dict(caps or {}),
            default_cap=default_cap, key=key, spool=journal.with_name(journal.name + ".spool"),
            persist=self._save, spool_key=journal_key, version=version,
            release_loss=release_loss)
        if journal.exists():
            self.participant.restore(open_state(journal.read_bytes(), journal_key))
        self.refused: list[str] = []
        #: The broker's receiving thread only queues; a worker trains and answers (a
        #: publish waits for the broker's receipt, which that thread delivers).
        self._inbox: queue.Queue[Delivery | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name=f"training-{spoke_id}",
                                        daemon=True)

    def start(self) -> None:
        self._worker.start()
        self.broker.subscribe(spoke_training_queue(self.spoke_id, self.federation),
                              self._inbox.put)

    def stop(self) -> None:
        self._inbox.put(None)
        self._worker.join(timeout=30)

    def _work(self) -> None:
        while (delivery := self._inbox.get()) is not None:
            try:
                self._on_message(delivery)
            except Exception:  # left unacked: the broker redelivers it
                log.exception("%s: training message left for redelivery", self.spoke_id)

    def _upload(self, location: str, data: bytes) -> msg.ObjectRef:
        self.store.put(location, data)
        return msg.ObjectRef(digest="sha256:" + hashlib.sha256(data).hexdigest(),
                             location=location, size=len(data))

    def _global_model(self, message: msg.RoundOpen) -> dict[str, np.ndarray]:
        verify_model(message.global_model_signature, message.global_model.digest, self.hub_key)
        data = self.store.get(message.global_model.location)
        if "sha256:" + hashlib.sha256(data).hexdigest() != message.global_model.digest:
            raise ProtocolError("the global model in the store does not match its digest")
        return decode_tensors(data)

    def _save(self) -> None:
        blob = seal_state(self.participant.state(), self.journal_key)
        fd, tmp = tempfile.mkstemp(dir=self.journal.parent, prefix=".training-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.journal)

    def _on_message(self, delivery: Delivery) -> None:
        message: Any = None
        try:
            _hub, message = open_message(delivery.body, {"hub": self.hub_key},
                                         msg.decode_training_from_hub)
            p = self.participant
            if isinstance(message, msg.RoundOpen):
                reply: Any = self._join(message)
            elif isinstance(message, msg.Keys):
                reply = p.on_keys(message)
            elif isinstance(message, msg.Delivery):
                reply = p.on_delivery(message)
            elif isinstance(message, msg.Consistency):
                reply = p.on_consistency(message)
            else:
                reply = p.on_unmask(message)
            self._save()
            self._audit_reply(reply)
            self.broker.publish(hub_training_queue(self.federation),
                                seal_message(self.key, reply))
        except (ProtocolError, SecAggError, TrainingRefused, UpdateError, KeyError) as exc:
            log.warning("%s refused a training message: %s", self.spoke_id, exc)
            self.refused.append(str(exc))
            self._refuse(message, exc)
        self.broker.ack(delivery)

    def _join(self, message: msg.RoundOpen) -> msg.Join:
        """Train and join; a fault on the way (the store, the engine, the registry) refuses
        the round with its reason instead of holding the training queue."""
        try:
            return self.participant.on_round_open(message, self._global_model(message))
        except (ProtocolError, SecAggError, TrainingRefused, UpdateError):
            raise
        except Exception as exc:
            log.exception("%s could not train for round %s", self.spoke_id,
                          message.secagg.round_id)
            raise TrainingRefused(f"the spoke could not train: {type(exc).__name__}: {exc}",
                                  "training_failed") from None

    def _refuse(self, message: Any, exc: Exception) -> None:
        """Audit the refusal; for a round's opening, tell the hub why, signed."""
        reason = exc.reason if isinstance(exc, TrainingRefused) else "protocol"
        target = getattr(message, "study_id", None) or "training"
        self.audit("training.refused", target, kind=getattr(message, "kind", None),
                   round=getattr(message, "round_index", None), reason=reason,
                   error=str(exc)[:2000])
        if isinstance(message, msg.RoundOpen):
            refusal = msg.Refusal(study_id=message.study_id,
                                  round_id=message.secagg.round_id,
                                  round_index=message.round_index, attempt=message.attempt,
                                  reason=reason, detail=str(exc)[:2000])
            self.broker.publish(hub_training_queue(self.federation),
                                seal_message(self.key, refusal))

    def _audit_reply(self, reply: Any) -> None:
        if isinstance(reply, msg.Join):
            self.audit("training.joined", reply.advert.round_id,
                       num_examples=reply.num_examples)
        elif isinstance(reply, msg.Masked):
            self.audit("training.masked_released", reply.masked.round_id,
                       digest=reply.upload.digest, location=reply.upload.location,
                       size=reply.upload.size, custody_sequence=self.participant.chain_sequence)
