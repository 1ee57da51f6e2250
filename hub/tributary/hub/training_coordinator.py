"""Runs training studies over the broker and the object store: opens rounds, routes the
SecAgg+ stages between spokes (every message signed), closes stages when everyone answered
or at the deadline, sums the masked vectors it reads from the store, and writes each next
global model to the store, content-addressed and signed. The round state itself lives in
the database (:mod:`tributary.hub.services.training`); this module is its I/O.

It keeps no state of its own: each pass of the loop (:meth:`TrainingCoordinator.step`)
derives what to do from the database (``training.next_step``) and reads the global model
by its digest from the store, so a hub killed at any point resumes every open study when it
starts again. A round's aggregation, the next global model's row and its object are
committed together (the object first: it is content-addressed, writing it twice is
harmless), so a round is never counted twice nor lost. Messages of a stage the hub may have
committed without sending are sent again once per process (``training.pending_messages``).

The web app runs it as a thread (``TRIBUTARY_HUB_RUN_TRAINING``, on by default, when the
hub has object-store credentials); ``tributary hub train`` runs it as a process of its
own (:func:`run`)."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from tributary.hub import tasks, training_checks
from tributary.hub.lease import Lease
from tributary.hub.models import Spoke, SpokeKey, TrainingRound, TrainingStudy
from tributary.hub.services import access_grants, audit, credentials, training, training_close
from tributary.hub.services.enrolment import public_key
from tributary.hub.settings import HubSettings
from tributary.protocol.broker import Delivery, PublishError, StompClient
from tributary.protocol.messages import ProtocolError
from tributary.protocol.objects import ObjectStore, ObjectStoreError, round_update_key
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
from tributary.protocol.training.update import schema_of

log = logging.getLogger(__name__)
#: Global models kept decoded in memory (a cache: the store is the record).
MODEL_CACHE = 4
MAX_REFUSALS_KEPT = 1000
#: Seconds before a round still open after its close was sent to the workers is sent again.
REENQUEUE_CLOSE_S = 60.0
#: The lease whose holder runs the round loop, one hub process at a time.
LEASE = "training"


def enrolled_training_keys(engine: Engine) -> dict[str, PublicKey]:
    """``"<spoke>/<keyid>" -> key`` for every active key of every spoke not revoked: the
    parties whose training messages the hub accepts (``open_message`` names the entry)."""
    with Session(engine) as session:
        rows = session.exec(select(SpokeKey, Spoke).where(
            SpokeKey.spoke_id == Spoke.id, col(SpokeKey.revoked_at).is_(None),
            col(Spoke.revoked_at).is_(None))).all()
    return {f"{k.spoke_id}/{k.keyid}": public_key(k.public_key_pem) for k, _ in rows}


class TrainingCoordinator:
    """The hub's round loop. ``spoke_keys`` (spoke -> key) pins the spokes' keys; without it
    the hub trusts the active keys enrolled in its database, read for each message."""

    def __init__(self, engine: Engine, broker: StompClient, store: ObjectStore,
                 key: SigningKey, spoke_keys: Mapping[str, PublicKey] | None,
                 federation: str, resume_grace_s: float = 0.0) -> None:
        self.engine, self.broker, self.store, self.key = engine, broker, store, key
        self.spoke_keys = None if spoke_keys is None else {
            f"{s}/pinned": k for s, k in spoke_keys.items()}
        self.federation = federation
        #: One writer of round rows at a time: the broker's thread and the round loop.
        self._lock = threading.Lock()
        #: The latest refusals (bounded: a hostile sender cannot grow it without end).
        self.refused: list[str] = []
        self._models: OrderedDict[tuple[str, str], tuple[msg.ObjectRef, Tensors]] = \
            OrderedDict()
        #: (round id, stage) whose messages this process has sent.
        self._sent: set[tuple[str, str]] = set()
        #: Round id -> when this process last sent its close to the workers.
        self._enqueued: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Stages are not closed at their deadline this long after the process started.
        self.resume_grace_s = resume_grace_s
        self._born = time.monotonic()

    def start(self) -> None:
        self.broker.subscribe(hub_training_queue(self.federation), self._on_message)

    # --- models ----------------------------------------------------------------------

    def put_model(self, round_index: int, study_id: str, params: Tensors) -> msg.ObjectRef:
        data = encode_tensors(params)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        location = training.model_location(study_id, round_index, digest)
        self.store.put(location, data)
        ref = msg.ObjectRef(digest=digest, location=location, size=len(data))
        self._remember(ref, decode_tensors(data))
        return ref

    def model(self, study_id: str, round_index: int, digest: str) -> tuple[msg.ObjectRef,
                                                                             Tensors]:
        """The global model going into ``round_index``, found by its digest in the store
        (checked against it; kept decoded for the next passes)."""
        location = training.model_location(study_id, round_index, digest)
        cached = self._models.get((location, digest))
        if cached is not None:
            return cached
        data = self.store.get(location)
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ProtocolError(f"global model at {location} does not match its digest")
        ref = msg.ObjectRef(digest=digest, location=location, size=len(data))
        return self._remember(ref, decode_tensors(data))

    def _remember(self, ref: msg.ObjectRef, params: Tensors) -> tuple[msg.ObjectRef, Tensors]:
        key = (ref.location, ref.digest)
        self._models[key] = (ref, params)
        self._models.move_to_end(key)
        while len(self._models) > MODEL_CACHE:
            self._models.popitem(last=False)
        return ref, params

    def global_model_at(self, study_id: str, round_index: int) -> Tensors:
        """The global model that went into ``round_index`` (the initial one at 0), by the
        digest its round recorded."""
        with Session(self.engine) as session:
            digests = [r.global_model_in for r in training.rounds_of(session, study_id)
                       if r.round_index == round_index and r.global_model_in]
        if not digests:
            raise KeyError(f"no round {round_index} in {study_id}")
        return self.model(study_id, round_index, digests[0])[1]

    # --- messages from spokes --------------------------------------------------------

    def _trusted(self) -> dict[str, PublicKey]:
        return self.spoke_keys if self.spoke_keys is not None else \
            enrolled_training_keys(self.engine)

    def _on_message(self, delivery: Delivery) -> None:
        try:
            trusted = self._trusted()
            party, message = open_message(delivery.body, trusted,
                                          msg.decode_training_from_spoke)
            self._apply(party.split("/", 1)[0], message, trusted[party])
        except (ProtocolError, SecAggError, training.TrainingError, KeyError,
                ValueError) as exc:
            # Hostile or stale: recorded and dropped, never retried forever.
            log.warning("training message refused: %s", exc)
            self.refused.append(str(exc))
            del self.refused[:-MAX_REFUSALS_KEPT]
        self.broker.ack(delivery)

    def _apply(self, sender: str, message: msg.TrainingFromSpoke, key: PublicKey) -> None:
        """Apply one message; ``key`` is the enrolled key that verified it (what checks
        of the sender's own signatures inside the message are made against)."""
        if isinstance(message, msg.Refusal):  # audited; the round goes on without it
            with self._lock, Session(self.engine) as session:
                training_checks.record_refusal(session, sender, message)
                session.commit()
                row = session.exec(select(TrainingRound).where(
                    TrainingRound.round_id == message.round_id)).first()
                if row is not None and training.count_out(session, row, message, sender):
                    session.commit()
            return
        with Session(self.engine) as session:  # a lapsed member's updates count no more
            lapsed = credentials.member_refusal(session, sender)
            if lapsed is not None:
                audit.record(session, "hub", "training.message_refused", sender,
                             kind=type(message).__name__, reason=lapsed)
                session.commit()
                raise training.TrainingError(f"{sender}: {lapsed}")
        inner = {msg.Join: lambda m: m.advert, msg.Shares: lambda m: m.bundle,
                 msg.Masked: lambda m: m.masked, msg.Signature: lambda m: m.signature,
                 msg.UnmaskReply: lambda m: m.response}[type(message)](message)
        with self._lock, Session(self.engine) as session:
            # Locked (PostgreSQL): a worker closing the round waits, or is waited for.
            row = session.exec(select(TrainingRound).where(
                TrainingRound.round_id == inner.round_id).with_for_update()).first()
            if row is None:
                raise training.TrainingError(f"no round {inner.round_id}")
            if isinstance(message, msg.Masked):
                expected = round_update_key(sender, row.round_index, f"{row.round_id}.masked")
                if message.upload.location != expected:
                    raise training.TrainingError(
                        f"{sender} uploaded to {message.upload.location}, not its own object")
                record = training_checks.check_masked_custody(
                    message, sender, key,
                    session.get(TrainingStudy, row.study_id), row)
                # Kept (or its refusal audited) even if the round refuses the input below: a
                # released update is in the spoke's chain whether or not it is summed.
                try:
                    training_checks.keep_custody(session, sender, key, message.custody or {},
                                                 record, message.upload.digest)
                finally:
                    session.commit()
            training.receive(session, row, message, sender)
            session.commit()

    # --- the round loop --------------------------------------------------------------

    def _send(self, receiver: str, message: msg.TrainingFromHub) -> None:
        self.broker.publish(spoke_training_queue(receiver, self.federation),
                            seal_message(self.key, message))

    def _send_stage(self, sent: tuple[str, str],
                    out: list[tuple[str, msg.TrainingFromHub]]) -> None:
        """Send a stage's messages; if one cannot be sent (the broker away), the stage is
        marked unsent so that the next pass sends it again to whoever has not answered."""
        try:
            for receiver, message in out:
                self._send(receiver, message)
        except Exception:
            self._sent.discard(sent)
            raise

    def _resuming(self) -> bool:
        return time.monotonic() - self._born < self.resume_grace_s

    @staticmethod
    def _upload_for(row: TrainingRound):  # type: ignore[no-untyped-def]
        return lambda s: round_update_key(s, row.round_index, f"{row.round_id}.masked")

    def step(self, study_id: str) -> bool:
        """One pass for one study: open its next attempt, or send what a restart may have
        left unsent and close the open stage if it is ready (aggregating the round and
        storing the next global model). False once the study has ended."""
        out: list[tuple[str, msg.TrainingFromHub]] = []
        with self._lock, Session(self.engine) as session:
            study = session.get(TrainingStudy, study_id)
            if study is None:
                raise training.TrainingError(f"no training study {study_id}")
            nxt = training.next_step(session, study)
            if nxt.action == "done":
                return False
            try:
                image = training.study_image(session, study)
            except training.AlgorithmRefused as exc:
                # Revoked (or changed) since the launch: no spoke is asked to run it again.
                training.fail(session, study, f"algorithm refused: {exc}")
                session.commit()
                return False
            if nxt.model_digest is None:
                raise training.TrainingError(f"study {study_id} has no global model")
            ref, params = self.model(study_id, nxt.model_index, nxt.model_digest)
            schema = schema_of(params)
            signature = sign_model(self.key, ref.digest)
            if nxt.action == "open":
                row = training.open_round(session, study, schema.size, nxt.round_index,
                                          nxt.attempt)
                session.commit()
                if row is None:
                    return False
            else:
                row = session.exec(select(TrainingRound).where(
                    TrainingRound.round_id == nxt.round_id)).one()
            sent = (row.round_id, row.stage)
            if sent not in self._sent:
                out = training.pending_messages(study, row, ref, signature,
                                                self._upload_for(row), image,
                                                access_grants.grant_for(session, study))
                self._sent.add(sent)
                if nxt.action == "drive":  # an open round this process did not open
                    audit.record(session, training.ACTOR, "training.round_resumed",
                                 row.round_id, stage=row.stage,
                                 resent_to=[r for r, _ in out])
                    session.commit()
        self._send_stage(sent, out)
        if nxt.action == "open":
            return True
        return self._advance(study_id, row.round_id, params)

    def _advance(self, study_id: str, round_id: str, params: Tensors) -> bool:
        schema = schema_of(params)
        with self._lock:
            with Session(self.engine) as session:
                study = session.get(TrainingStudy, study_id)
                row = session.exec(select(TrainingRound).where(
                    TrainingRound.round_id == round_id)).one()
                if self._resuming() and not training.all_answered(row):
                    # Just started: answers that arrived while the hub was down are still
                    # being taken off the broker; a deadline that passed meanwhile must not
                    # drop them.
                    return True
                out: list[tuple[str, msg.TrainingFromHub]] = []
                # The unmask stage closes with the round: the heavy step, a Celery task.
                close = row.stage == "unmask" and training.ready(row)
                if row.stage != "unmask":
                    out, _ = training.advance(
                        session, study, row,
                        lambda location: vector_from_bytes(self.store.get(location), 32,
                                                           schema.size),
                        schema.size)
                    session.commit()
                sent = (row.round_id, row.stage)
                self._sent.add(sent)
                running = study.state == "running"
            if close and tasks.in_process():
                running = self._close_here(study_id, round_id)
        if close and not tasks.in_process():
            self._enqueue_close(round_id)
        self._send_stage(sent, out)
        return running

    def _close_here(self, study_id: str, round_id: str) -> bool:
        """Close the round in this process (no Celery broker: the task's body, called);
        whether the study still runs."""
        with Session(self.engine) as session:
            new = training_close.close_round(session, self.store, round_id)
            if new is not None:
                self._remember(*new)
            study = session.get(TrainingStudy, study_id)
            return study is not None and study.state == "running"

    def _enqueue_close(self, round_id: str) -> None:
        """Send the round's close to the workers, again if it is still open a while later
        (a lost task; the close is idempotent, a second one finds the round aggregated)."""
        now = time.monotonic()
        if now - self._enqueued.get(round_id, -math.inf) < REENQUEUE_CLOSE_S:
            return
        self._enqueued[round_id] = now
        while len(self._enqueued) > MAX_REFUSALS_KEPT:
            self._enqueued.pop(next(iter(self._enqueued)))
        tasks.aggregate_training_round(round_id)

    def run(self, study_id: str, initial: Tensors, poll_s: float = 0.2,
            timeout_s: float = 3600.0) -> tuple[TrainingStudy, Tensors]:
        """Store ``initial`` as the study's first global model and drive the study to its
        end in this thread; returns the final study and its last global model."""
        params = {k: np.asarray(v) for k, v in initial.items()}
        ref = self.put_model(0, study_id, params)
        with self._lock, Session(self.engine) as session:
            study = session.get(TrainingStudy, study_id)
            study.global_model = ref.digest
            session.add(study)
            session.commit()
        deadline = time.monotonic() + timeout_s
        while self._step_or_retry(study_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"study {study_id} did not end within {timeout_s} s")
            time.sleep(poll_s)
        with Session(self.engine) as session:
            study = session.get(TrainingStudy, study_id)
            return study, self.model(study_id, *self._last_model(session, study))[1]

    def _step_or_retry(self, study_id: str) -> bool:
        """:meth:`step`, where the broker or the store being away (a broker killed and
        restarting) fails only this pass: what was not sent is sent on the next one."""
        try:
            return self.step(study_id)
        except (PublishError, ObjectStoreError) as exc:
            log.warning("training study %s: pass failed, tried again: %s", study_id, exc)
            return True

    @staticmethod
    def _last_model(session: Session, study: TrainingStudy) -> tuple[int, str]:
        done = [r for r in training.rounds_of(session, study.id) if r.stage == "aggregated"]
        if done:
            return done[-1].round_index + 1, done[-1].global_model_out or ""
        return 0, study.global_model or ""

    # --- the hub service ---------------------------------------------------------------

    def running_studies(self) -> list[str]:
        with Session(self.engine) as session:
            return list(session.exec(select(TrainingStudy.id).where(
                TrainingStudy.state == "running").order_by(TrainingStudy.created_at)))

    def step_all(self) -> None:
        """One pass over every running study; a study that fails a pass (the store
        unreachable, a model that does not match its digest) is logged and tried again
        on the next pass, never stopping the others."""
        for study_id in self.running_studies():
            try:
                self.step(study_id)
            except (ProtocolError, ObjectStoreError, PublishError, SecAggError,
                    training.TrainingError, KeyError, ValueError) as exc:
                log.warning("training study %s: %s", study_id, exc)

    def serve(self, poll_s: float = 0.5) -> TrainingCoordinator:
        """Run the loop in a thread until :meth:`stop`, in whichever hub process holds the
        training lease (:mod:`tributary.hub.lease`): the others wait, neither consuming the
        hub's training queue nor stepping, and one of them takes over when the holder dies.
        """
        lease = Lease(self.engine, LEASE)

        def loop() -> None:
            leading = waiting_said = False
            while not self._stop.is_set():
                try:
                    if leading and not lease.held():
                        leading = self._follow()
                    if not leading and lease.try_acquire():
                        leading = self._lead()
                    elif not leading and not waiting_said:
                        log.info("another hub process runs the training loop; waiting for "
                                 "its lease")
                        waiting_said = True
                    if leading:
                        self.step_all()
                except Exception:  # a database fault: the next pass tries again
                    log.exception("training loop")
                self._stop.wait(poll_s)
            if leading:
                self.broker.unsubscribe(hub_training_queue(self.federation))
            lease.release()

        self._thread = threading.Thread(target=loop, name="hub-training", daemon=True)
        self._thread.start()
        return self

    def _lead(self) -> bool:
        """Took the lease: consume the training queue, resend what a stage may have
        committed unsent (this process's memory of sends starts afresh), audit."""
        self._sent.clear()
        self._enqueued.clear()
        self._born = time.monotonic()  # deadlines get the resume grace, as after a restart
        with Session(self.engine) as session:
            audit.record(session, "hub", "training.loop_taken", LEASE,
                         host=socket.gethostname(), pid=os.getpid())
            session.commit()
        self.start()
        log.info("this process runs the training loop (it holds the training lease)")
        return True

    def _follow(self) -> bool:
        """Lost the lease (its database connection went): stop consuming and stepping."""
        self.broker.unsubscribe(hub_training_queue(self.federation))
        log.warning("training lease lost; this process stops running the training loop")
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def from_settings(settings: HubSettings, engine: Engine, broker: StompClient,
                  key: SigningKey) -> TrainingCoordinator | None:
    """The hub's coordinator, or None when the hub has no object store configured."""
    if settings.objectstore_credentials is None:
        log.info("no object store credentials (TRIBUTARY_HUB_OBJECTSTORE_CREDENTIALS): "
                 "federated training is off")
        return None
    store = ObjectStore.from_file(settings.objectstore_credentials)
    return TrainingCoordinator(engine, broker, store, key, None, settings.broker_federation,
                               settings.training_resume_grace_seconds)


def run(settings: HubSettings | None = None, stop: threading.Event | None = None) -> None:
    """Run the round loop as a process of its own until SIGTERM or SIGINT (or ``stop``).
    Run the web app with TRIBUTARY_HUB_RUN_TRAINING=false beside it."""
    from tributary.hub.db import open_database

    settings = settings or HubSettings()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    if settings.objectstore_credentials is None:
        raise SystemExit("set TRIBUTARY_HUB_OBJECTSTORE_CREDENTIALS: training needs the "
                         "hub's object-store credentials")
    engine = open_database(settings)
    tasks.configure(settings)  # rounds are closed here, or by workers with a broker
    key = SigningKey.load_or_create(settings.signing_key)
    broker = StompClient(settings.broker(), "hub-training").start()
    coordinator = from_settings(settings, engine, broker, key)
    assert coordinator is not None
    try:
        coordinator.serve(settings.training_poll_seconds)
        log.info("training coordinator on %s", hub_training_queue(settings.broker_federation))
        while not stop.wait(1.0):
            pass
    finally:
        coordinator.stop()
        broker.close()
        engine.dispose()
