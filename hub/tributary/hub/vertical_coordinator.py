"""Runs vertical studies over the broker and the object store: sends each stage's signed
messages, takes the spokes' signed answers (the enrolled key that verified a message, not
the message, names its sender), copies each spoke's ciphertexts from its own area of the
store to the global area its peer may read (checked against their digests) and closes the
stages (:mod:`tributary.hub.services.vertical`).

No state of its own: every pass derives what to send from the study's row, and a stage's
messages are sent again to whoever has not answered after ``resend_s`` (and once by every
new process), so a hub or a spoke that restarted, or a message lost with a broker, only
delays a round; the spokes answer a repeated message with the answer they already gave."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from tributary.hub.models import VerticalStudy
from tributary.hub.services import credentials, vertical
from tributary.hub.settings import HubSettings
from tributary.hub.training_coordinator import enrolled_training_keys
from tributary.protocol.broker import Delivery, PublishError, StompClient
from tributary.protocol.cohorts import vertical as vmsg
from tributary.protocol.cohorts.vertical_lr import MAX_VECTOR_BYTES
from tributary.protocol.messages import ProtocolError
from tributary.protocol.objects import ObjectStore, ObjectStoreError
from tributary.protocol.signing import PublicKey, SigningKey
from tributary.protocol.training.rounds import ObjectRef
from tributary.protocol.training.transport import open_message, seal_message

log = logging.getLogger(__name__)
MAX_REFUSALS_KEPT = 1000


class VerticalCoordinator:
    """``spoke_keys`` (spoke -> key) pins the spokes' keys; without it the hub trusts the
    active keys enrolled in its database."""

    def __init__(self, engine: Engine, broker: StompClient, store: ObjectStore,
                 key: SigningKey, spoke_keys: Mapping[str, PublicKey] | None,
                 federation: str, resend_s: float = 30.0) -> None:
        self.engine, self.broker, self.store, self.key = engine, broker, store, key
        self.spoke_keys = None if spoke_keys is None else {
            f"{s}/pinned": k for s, k in spoke_keys.items()}
        self.federation, self.resend_s = federation, resend_s
        self._lock = threading.Lock()
        self.refused: list[str] = []
        #: (study, round, stage, spoke) -> when this process last sent it.
        self._sent: dict[tuple[str, int, str, str], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.broker.subscribe(vmsg.hub_vertical_queue(self.federation), self._on_message)

    # --- messages from spokes ----------------------------------------------------------

    def _trusted(self) -> dict[str, PublicKey]:
        return self.spoke_keys if self.spoke_keys is not None else \
            enrolled_training_keys(self.engine)

    def _on_message(self, delivery: Delivery) -> None:
        try:
            party, message = open_message(delivery.body, self._trusted(),
                                          vmsg.decode_vertical_from_spoke)
            self._apply(party.split("/", 1)[0], message)
        except (ProtocolError, vertical.VerticalError, KeyError, ValueError) as exc:
            log.warning("vertical message refused: %s", exc)
            self.refused.append(str(exc))
            del self.refused[:-MAX_REFUSALS_KEPT]
        self.broker.ack(delivery)

    def _apply(self, sender: str, message: vmsg.VerticalFromSpoke) -> None:
        with self._lock, Session(self.engine) as session:
            study = session.exec(select(VerticalStudy).where(
                VerticalStudy.id == message.study_id).with_for_update()).first()
            if study is None:
                raise vertical.VerticalError(f"no vertical study {message.study_id}")
            if sender not in vertical.parties(study):
                raise vertical.VerticalError(f"{sender} is not a party of {study.id}")
            lapsed = credentials.member_refusal(session, sender)
            if lapsed is not None:  # two parties: the study cannot go on without it
                if study.state == "running":
                    vertical.fail(session, study, f"{sender}: {lapsed}")
                    session.commit()
                raise vertical.VerticalError(f"{sender}: {lapsed}")
            if isinstance(message, vmsg.Status):
                vertical.apply_status(session, study, sender, message)
            elif isinstance(message, vmsg.Reply):
                if study.state != "running":
                    return  # a late answer to a study that ended: nothing to do
                vertical.apply_reply(session, study, sender, message)
            else:
                vertical.apply_final(session, study, sender, message)
            session.commit()

    # --- the loop ----------------------------------------------------------------------

    def _copy(self, study: VerticalStudy, spoke: str) -> ObjectRef:
        """The spoke's answer object, checked against its digest, copied to the global area
        (idempotent: the same bytes to the same key)."""
        answer = vmsg.Reply.model_validate(study.answers[spoke])
        assert answer.object is not None
        if answer.object.size > MAX_VECTOR_BYTES:
            raise vertical.VerticalError(f"{spoke}'s object is larger than allowed")
        data = self.store.get(answer.object.location)
        if len(data) > MAX_VECTOR_BYTES:
            raise vertical.VerticalError(f"{spoke}'s object is larger than allowed")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest != answer.object.digest:
            raise vertical.VerticalError(f"{spoke}'s object does not match its digest")
        location = vertical.relay_location(study, spoke)
        self.store.put(location, data)
        return ObjectRef(digest=digest, location=location, size=len(data))

    def step(self, study_id: str) -> bool:
        """One pass for one study: close its stage if both answered, send what is unanswered
        (again, once ``resend_s`` passed). False once nothing is left to do."""
        with self._lock, Session(self.engine) as session:
            study = session.get(VerticalStudy, study_id)
            if study is None:
                raise vertical.VerticalError(f"no vertical study {study_id}")
            if vertical.stage_complete(study):
                copies = None
                if study.stage in ("share", "cross"):
                    try:
                        copies = {s: self._copy(study, s) for s in vertical.parties(study)}
                    except vertical.VerticalError as exc:
                        vertical.fail(session, study, str(exc))
                if study.state == "running":
                    vertical.advance(session, study, copies)
                session.commit()
                session.refresh(study)
            out = vertical.pending_messages(study)
            round_index, stage = study.round_index, study.stage
            alive = study.id in vertical.open_studies(session)
        now = time.monotonic()
        for message in out:
            slot = (study_id, round_index, stage, message.spoke_id)
            if now - self._sent.get(slot, -1e18) < self.resend_s:
                continue
            self.broker.publish(vmsg.spoke_vertical_queue(message.spoke_id, self.federation),
                                seal_message(self.key, message))
            self._sent[slot] = now
        return alive

    def step_all(self) -> None:
        with Session(self.engine) as session:
            studies = vertical.open_studies(session)
        for study_id in studies:
            try:
                self.step(study_id)
            except (ProtocolError, ObjectStoreError, PublishError, vertical.VerticalError,
                    KeyError, ValueError) as exc:
                log.warning("vertical study %s: %s", study_id, exc)

    def serve(self, poll_s: float = 0.5) -> VerticalCoordinator:
        """Subscribe and run the loop in a thread until :meth:`stop`."""
        self.start()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.step_all()
                except Exception:  # a database fault: the next pass tries again
                    log.exception("vertical loop")
                self._stop.wait(poll_s)

        self._thread = threading.Thread(target=loop, name="hub-vertical", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def from_settings(settings: HubSettings, engine: Engine, broker: StompClient,
                  key: SigningKey) -> VerticalCoordinator | None:
    """The hub's vertical coordinator, or None when the hub has no object store (the
    ciphertexts travel through it)."""
    if settings.objectstore_credentials is None:
        log.info("no object store credentials: vertical training is off")
        return None
    return VerticalCoordinator(engine, broker, ObjectStore.from_file(
        settings.objectstore_credentials), key, None, settings.broker_federation)
