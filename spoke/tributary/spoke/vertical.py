"""The spoke's side of vertical training: takes the hub's signed vertical messages from its
own queue, holds each invitation for the site's data steward, refuses a study that names
attributes outside the site's ``[training] vertical_attributes`` or a PSI it has no linking
table for (telling the hub why), and, once approved, plays its party of the vertical
logistic regression (:mod:`tributary.protocol.cohorts.vertical_lr`).

What leaves: the party's Paillier public key, the linked cohort's size and column count,
ciphertexts (its own share under its own key; its masked cross terms under the peer's key)
through its own area of the object store, the peer's masked values it decrypted, and (label
party) one loss a round. Never a pseudonym, a case id or a feature value: rows are lined up
by the linking table's order. Each answer is written, with the state it came from, to the
:class:`~tributary.spoke.vertical_desk.VerticalDesk` before it is sent and the message is
acknowledged only after: a redelivered message or a restart gets the same answer.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tributary.protocol.broker import Delivery, StompClient
from tributary.protocol.cohorts import vertical as vmsg
from tributary.protocol.cohorts import vertical_lr as lr
from tributary.protocol.messages import ProtocolError
from tributary.protocol.objects import ObjectStore, round_update_key
from tributary.protocol.signing import PublicKey, SigningKey
from tributary.protocol.training.rounds import ObjectRef
from tributary.protocol.training.transport import open_message, seal_message
from tributary.spoke.linkage import Linkage
from tributary.spoke.vertical_desk import (
    ACCEPTED,
    APPROVED,
    FINISHED,
    PENDING,
    REFUSED,
    REJECTED,
    StudyState,
    VerticalDesk,
)

log = logging.getLogger(__name__)
#: case id -> the case's attributes (the catalog's, from the site's attributes file).
Features = Callable[[], Mapping[str, Mapping[str, Any]]]
#: The latest refusals kept in memory (bounded: a hostile sender cannot grow it).
MAX_REFUSALS_KEPT = 1000


class Refused(ValueError):
    """The spoke will not take part; the reason goes to the hub."""


def _no_audit(action: str, target: str, **detail: Any) -> None:
    del action, target, detail


class VerticalAgent:
    def __init__(self, spoke_id: str, broker: StompClient, store: ObjectStore,
                 key: SigningKey, hub_key: PublicKey, federation: str, work_dir: Path,
                 journal_key: bytes, allowed: list[str], features: Features,
                 audit: Callable[..., None] = _no_audit, poll_s: float = 0.5) -> None:
        self.spoke_id, self.broker, self.store, self.key = spoke_id, broker, store, key
        self.hub_key, self.federation, self.work_dir = hub_key, federation, work_dir
        self.allowed, self.features, self.audit = set(allowed), features, audit
        self.poll_s = poll_s
        self.desk = VerticalDesk(work_dir / "vertical.sqlite", journal_key)
        self.refused: list[str] = []
        self._inbox: queue.Queue[Delivery | None] = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name=f"vertical-{spoke_id}",
                                        daemon=True)

    # --- the process ---------------------------------------------------------------------

    def start(self) -> VerticalAgent:
        self._worker.start()
        self.broker.subscribe(vmsg.spoke_vertical_queue(self.spoke_id, self.federation),
                              self._inbox.put)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._worker.join(timeout=30)
        self.desk.close()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                delivery = self._inbox.get(timeout=self.poll_s)
            except queue.Empty:
                delivery = None
            try:
                if delivery is not None:
                    self._on_message(delivery)
                self.apply_decisions()
            except Exception:  # left unacked: the broker redelivers it
                log.exception("%s: vertical message left for redelivery", self.spoke_id)

    def _send(self, message: Any) -> None:
        self.broker.publish(vmsg.hub_vertical_queue(self.federation),
                            seal_message(self.key, message))

    def _on_message(self, delivery: Delivery) -> None:
        message: Any = None
        try:
            _hub, message = open_message(delivery.body, {"hub": self.hub_key},
                                         vmsg.decode_vertical_from_hub)
            if message.spoke_id != self.spoke_id:
                raise ProtocolError(f"message for {message.spoke_id}, not this spoke")
            if isinstance(message, vmsg.Invite):
                self._invite(message)
            elif isinstance(message, vmsg.Step):
                self._step(message)
            else:
                self._finish(message)
        except (ProtocolError, lr.VerticalError, Refused, ValueError) as exc:
            log.warning("%s refused a vertical message: %s", self.spoke_id, exc)
            self.refused.append(str(exc)[:2000])
            del self.refused[:-MAX_REFUSALS_KEPT]
            study = getattr(message, "study_id", None)
            self.audit("vertical.refused", study or "vertical",
                       kind=getattr(message, "kind", None), error=str(exc)[:2000])
            if study is not None and not isinstance(message, vmsg.Finish):
                held = self.desk.get(study)
                if held is not None and held.state not in (REFUSED, FINISHED):
                    self.desk.set_state(study, REFUSED, str(exc)[:2000])
                self._send(vmsg.Status(study_id=study, state="refused",
                                       reason=str(exc)[:2000]))
        self.broker.ack(delivery)

    # --- invitation, steward, acceptance -----------------------------------------------

    def _check(self, invite: vmsg.Invite) -> None:
        asked = [*invite.attributes, *([invite.label] if invite.label else [])]
        outside = sorted(set(asked) - self.allowed)
        if outside:
            raise Refused(f"attributes outside this site's vertical_attributes: {outside}")
        with Linkage(self.work_dir) as linkage:
            if not linkage.exists(invite.psi_id):
                raise Refused(f"no linking table for PSI {invite.psi_id} at this site")

    def _invite(self, invite: vmsg.Invite) -> None:
        held = self.desk.get(invite.study_id)
        if held is not None:
            if held.invite != invite.model_copy(update={"message_id": held.invite.message_id,
                                                        "sent_at": held.invite.sent_at}):
                raise ProtocolError(f"study {invite.study_id} was invited otherwise before")
            self._resend_status(invite.study_id)
            return
        self._check(invite)
        self.desk.hold(invite)
        self.audit("vertical.held", invite.study_id, psi=invite.psi_id, role=invite.role,
                   attributes=invite.attributes, label=invite.label, peer=invite.peer)
        self._send(vmsg.Status(study_id=invite.study_id, state="held",
                               reason="waiting for the site's data steward"))

    def _resend_status(self, study_id: str) -> None:
        held = self.desk.get(study_id)
        assert held is not None
        if held.state in (PENDING, APPROVED):
            self._send(vmsg.Status(study_id=study_id, state="held",
                                   reason="waiting for the site's data steward"))
        elif held.state in (REJECTED, REFUSED):
            self._send(vmsg.Status(study_id=study_id, state="refused",
                                   reason=held.reason or "refused"))
        elif held.state == ACCEPTED:
            self._send(self._accepted(study_id))
        else:  # finished: an invitation that was still on its way; the study has ended
            log.info("%s: invitation of the ended vertical study %s dropped", self.spoke_id,
                     study_id)

    def _accepted(self, study_id: str) -> vmsg.Status:
        study = self.desk.load(study_id)
        assert study is not None
        return vmsg.Status(study_id=study_id, state="accepted",
                           public_key=vmsg.PublicKey(n=study.party.n_hex),
                           rows=len(study.columns), features=len(study.party.weights))

    def apply_decisions(self) -> None:
        """Accept the studies the steward approved, refuse the ones rejected."""
        for held in self.desk.studies(APPROVED, REJECTED):
            if held.state == REJECTED:
                reason = f"the site's data steward rejected it: {held.reason or 'no reason'}"
                self.desk.set_state(held.study_id, REFUSED, reason)
                self.audit("vertical.rejected", held.study_id, steward=held.steward)
                self._send(vmsg.Status(study_id=held.study_id, state="refused",
                                       reason=reason[:2000]))
                continue
            try:
                study = self._read_cohort(held.invite)
            except (Refused, lr.VerticalError) as exc:
                self.desk.set_state(held.study_id, REFUSED, str(exc)[:2000])
                self.audit("vertical.refused", held.study_id, error=str(exc)[:2000])
                self._send(vmsg.Status(study_id=held.study_id, state="refused",
                                       reason=str(exc)[:2000]))
                continue
            self.desk.set_state(held.study_id, ACCEPTED, study=study)
            self.audit("vertical.accepted", held.study_id, steward=held.steward,
                       rows=len(study.columns), features=len(study.party.weights))
            self._send(self._accepted(held.study_id))

    def _read_cohort(self, invite: vmsg.Invite) -> StudyState:
        """The linked rows' columns, in the linking table's order, and a new key."""
        self._check(invite)  # the allowlist or the linking table may have changed since
        with Linkage(self.work_dir) as linkage:
            pairs = linkage.cases(invite.psi_id)
        attributes = self.features()
        names = [*invite.attributes, *([invite.label] if invite.label else [])]
        missing = sum(1 for _, case in pairs
                      if not all(n in attributes.get(case, {}) for n in names))
        if missing:
            raise Refused(f"{missing} linked case(s) lack one of the study's attributes")
        rows: list[list[float]] = []
        for _, case in pairs:
            try:
                rows.append([float(attributes[case][n]) for n in invite.attributes])
            except (TypeError, ValueError):
                raise Refused("an attribute of the study is not numeric at this site") from None
        if len(rows) < vmsg.MIN_ROWS:
            raise Refused(f"the linked cohort has fewer than {vmsg.MIN_ROWS} rows")
        y = None
        if invite.label is not None:
            y = lr.labels([attributes[case][invite.label] for _, case in pairs],
                          invite.positive)
        party, _ = lr.new_party(invite.role, list(invite.attributes), np.asarray(rows),
                                invite.hyperparameters.key_bits)
        return StudyState(party=party, columns=rows, y=None if y is None else list(y))

    # --- rounds -------------------------------------------------------------------------

    def _party(self, invite: vmsg.Invite, study: StudyState) -> lr.Party:
        z, means, scales = lr.standardise(np.asarray(study.columns))
        del means, scales
        if invite.role == "label":
            z = np.hstack([z, np.ones((z.shape[0], 1))])
        y = None if study.y is None else np.asarray(study.y)
        hyper = invite.hyperparameters
        return lr.Party(study.party, z, y, hyper.l2, hyper.learning_rate)

    def _step(self, step: vmsg.Step) -> None:
        held = self.desk.get(step.study_id)
        if held is None or held.state != ACCEPTED:
            raise Refused(f"study {step.study_id} is not accepted at this site")
        study = self.desk.load(step.study_id)
        assert study is not None
        slot = f"{step.round_index}/{step.stage}"
        if slot in study.party.answers:  # redelivered: the same answer again
            self._send(vmsg.Reply.model_validate_json(study.party.answers[slot]))
            return
        if step.round_index < study.party.round_index:  # stale, answered long ago
            log.info("%s: stale vertical step %s of %s dropped", self.spoke_id, slot,
                     step.study_id)
            return
        if step.round_index != study.party.round_index:
            raise ProtocolError(f"round {step.round_index} while this party is at round "
                                f"{study.party.round_index}")
        party = self._party(held.invite, study)
        reply = self._compute(step, party, study)
        study.party.answers = {k: v for k, v in study.party.answers.items()
                               if int(k.split("/")[0]) >= step.round_index - 1}
        study.party.answers[slot] = reply.model_dump_json()
        self.desk.save(step.study_id, study)
        self.audit("vertical.answered", step.study_id, round=step.round_index,
                   stage=step.stage, size=reply.object.size if reply.object else None,
                   values=len(reply.values or []), loss=reply.loss is not None)
        self._send(reply)

    def _compute(self, step: vmsg.Step, party: lr.Party, study: StudyState) -> vmsg.Reply:
        base = {"study_id": step.study_id, "round_index": step.round_index,
                "stage": step.stage}
        if step.stage == "share":
            return vmsg.Reply(**base, object=self._upload(step, party.share()))
        if step.stage == "cross":
            if step.peer_key is None or step.peer_object is None:
                raise ProtocolError("a cross step carries the peer's key and ciphertexts")
            if study.party.peer_n_hex not in (None, step.peer_key.n):
                raise ProtocolError("the peer's key changed during the study")
            study.party.peer_n_hex = step.peer_key.n
            data = party.cross(lr.public_key(step.peer_key.n), self._fetch(step.peer_object))
            return vmsg.Reply(**base, object=self._upload(step, data))
        if step.stage == "decrypt":
            if step.peer_object is None:
                raise ProtocolError("a decrypt step carries the peer's ciphertexts")
            peer_features = self._peer_features(step)
            values, loss = party.decrypt(self._fetch(step.peer_object), peer_features)
            return vmsg.Reply(**base, values=[str(v) for v in values], loss=loss)
        if step.values is None:
            raise ProtocolError("an apply step carries the decrypted values")
        party.apply([int(v) for v in step.values])
        return vmsg.Reply(**base)

    @staticmethod
    def _peer_features(step: vmsg.Step) -> int:
        """How many masked values the peer sent (checked against the vector by ``load``)."""
        if step.peer_features is None:
            raise ProtocolError("a decrypt step says how many values the peer masked")
        return step.peer_features

    def _upload(self, step: vmsg.Step, data: bytes) -> ObjectRef:
        name = f"{step.study_id}.{step.stage}.bin"[-128:].lstrip("._-") or "vertical.bin"
        location = round_update_key(self.spoke_id, step.round_index, name)
        self.store.put(location, data)
        return ObjectRef(digest="sha256:" + hashlib.sha256(data).hexdigest(),
                         location=location, size=len(data))

    def _fetch(self, ref: ObjectRef) -> bytes:
        if ref.size > lr.MAX_VECTOR_BYTES:
            raise ProtocolError("ciphertext object too large")
        data = self.store.get(ref.location)
        if len(data) > lr.MAX_VECTOR_BYTES:
            raise ProtocolError("ciphertext object too large")
        if "sha256:" + hashlib.sha256(data).hexdigest() != ref.digest:
            raise ProtocolError("the object in the store does not match its digest")
        return data

    # --- the end -------------------------------------------------------------------------

    def _finish(self, finish: vmsg.Finish) -> None:
        held = self.desk.get(finish.study_id)
        if held is None:
            raise Refused(f"no vertical study {finish.study_id} here")
        if held.state == PENDING:  # withdrawn before the steward decided
            self.audit("vertical.withdrawn", finish.study_id, state=finish.state)
        study = self.desk.load(finish.study_id)
        if study is not None and study.final is not None:
            self._send(vmsg.Final.model_validate_json(study.final))
            return
        final = vmsg.Final(study_id=finish.study_id)
        if study is not None and finish.state == "completed" \
                and held.invite.release_coefficients:
            coefficients, intercept = self._party(held.invite, study).coefficients()
            final = vmsg.Final(study_id=finish.study_id, intercept=intercept, coefficients=[
                vmsg.Coefficient(name=k, value=v) for k, v in coefficients.items()])
        if study is not None:
            # The private key and masks go; the weights stay (the site's part of the model).
            study.party.p_hex = study.party.q_hex = "0"
            study.party.masks, study.party.answers = [], {}
            study.final = final.model_dump_json()
        self.desk.set_state(finish.study_id, FINISHED, study=study)
        self.audit("vertical.finished", finish.study_id, state=finish.state,
                   released=final.coefficients is not None)
        self._send(final)
