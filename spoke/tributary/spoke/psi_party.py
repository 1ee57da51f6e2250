"""A spoke's part in private set intersections (docs/cohorts.md#private-set-intersection).

The first participant of a request is the *leader*: the PSI client of every other
participant (*partners*). Per partner: both send a signed ``hello`` (ephemeral X25519
key); the leader sends its blinded ``request``; the partner answers with its blinded setup
and the ``response`` (a fresh server key per PSI); the leader learns, per partner, which of
its own identifiers are shared (or, for two spokes in cardinality mode, only how many).
The leader intersects the pairwise results over its own identifiers. In cardinality mode it
reports the size (suppressed under its k) and nobody else learns anything; in intersection
mode it derives the PSI's link key, keeps its linking table, and sends each partner (under
their pair key) the link key and the shared pseudonyms, which the partner maps back to its
own cases. Every step is one journal transaction with the messages it sends.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from tributary.protocol.cohorts.psi import (
    MAX_PAYLOAD_CHARS,
    PsiForward,
    PsiMode,
    PsiRelay,
    PsiRequest,
    PsiState,
    PsiStatus,
    PsiStep,
)
from tributary.protocol.signing import SigningKey
from tributary.spoke import psi_crypto as crypto
from tributary.spoke.config import SpokeConfig
from tributary.spoke.journal import Journal, Outgoing
from tributary.spoke.linkage import Linkage, LinkageExists
from tributary.spoke.psi_identifiers import NoIdentifiers, link_identifiers
from tributary.spoke.psi_store import (
    APPLIED,
    APPROVED,
    PENDING,
    REJECTED,
    PsiRow,
    add_forward,
    create_tables,
    psis_where,
    read_psi,
)

log = logging.getLogger(__name__)

Audit = Callable[..., None]
Seal = Callable[[Any], Outgoing]


class PsiAbort(Exception):
    """The PSI cannot go on at this spoke; the reason goes to the hub as ``failed``."""


def reveals(request: PsiRequest) -> bool:
    """Whether the leader learns which of its identifiers are shared (not only how many):
    needed to link, and to intersect more than one pairwise result."""
    return request.mode == PsiMode.INTERSECTION or len(request.participants) > 2


class PsiParty:
    """The spoke's side of PSIs. ``seal`` signs a message for the outbox, ``audit``
    appends to the spoke's audit log, ``identifiers`` reads the agreed identifiers."""

    def __init__(self, config: SpokeConfig, journal: Journal, key: SigningKey, seal: Seal,
                 audit: Audit, wake_outbox: Callable[[], None],
                 identifiers: Callable[[], dict[str, str]] | None = None) -> None:
        self.config = config
        self.me = config.spoke_id
        self.journal = journal
        self.key = key
        self.seal = seal
        self.audit = audit
        self.wake_outbox = wake_outbox
        self.identifiers = identifiers or (lambda: link_identifiers(config))
        with journal.transaction() as db:
            create_tables(db)

    # -- messages from the hub ----------------------------------------------------------------
    def take_request(self, request: PsiRequest) -> None:
        """Journal a request (held for the steward, refused at once when the site cannot
        take part, or approved when the site's policy needs no steward)."""
        refusal = self._refusal(request)
        with self.journal.transaction() as db:
            if read_psi(db, request.psi_id) is not None:
                self.audit("message.dropped", request.psi_id, actor="hub",
                           message_id=request.message_id, reason="replay: already received")
                return
            steward = PENDING if self.config.cohorts.approve_psi and not refusal else None
            db.execute("INSERT INTO psi_requests (psi_id, message, state) VALUES (?, ?, ?)",
                       (request.psi_id, request.model_dump_json(), PsiState.HELD.value))
            db.execute("UPDATE psi_requests SET steward=? WHERE psi_id=?",
                       (steward, request.psi_id))
            self.audit("psi.received", request.psi_id, actor="hub", mode=request.mode.value,
                       leader=request.leader, requested_by=request.requested_by,
                       purpose=request.purpose,
                       participants=[p.spoke_id for p in request.participants])
            if refusal:
                self._settle(db, request, PsiState.REFUSED, refusal)
            elif steward == PENDING:
                self._status(db, request, PsiState.HELD,
                             reason="awaiting approval by the site's data steward")
                self.audit("steward.psi_held", request.psi_id)
            else:
                self._approve(db, request, "site policy (no steward approval required)")
        self.wake_outbox()

    def take_forward(self, forward: PsiForward) -> None:
        """Journal a relayed message; it is processed by :meth:`work`."""
        with self.journal.transaction() as db:
            fresh = add_forward(db, forward)
        self.audit("psi.relayed_in" if fresh else "message.dropped", forward.psi_id,
                   actor="hub", step=forward.step.value, from_spoke=forward.from_spoke,
                   relay_message_id=forward.relay_message_id, size=len(forward.payload),
                   **({} if fresh else {"reason": "replay: already received"}))

    def _refusal(self, request: PsiRequest) -> str | None:
        if request.expires_at is not None and request.expires_at < datetime.now(UTC):
            return "PSI request expired"
        if self.config.cohorts.link_identifier is None:
            return "this site names no [cohorts] link_identifier and takes part in no PSI"
        if request.key_of(self.me) != self.key.public.pem:
            return "the request names another key for this spoke"
        return None

    # -- the steward --------------------------------------------------------------------------
    def apply_decisions(self) -> int:
        """Act on the steward's decisions (made by another process in the same database);
        returns how many were applied."""
        with self.journal.transaction() as db:
            rows = psis_where(db, "steward IN (?, ?)", (APPROVED, REJECTED))
            for row in rows:
                db.execute("UPDATE psi_requests SET steward=? WHERE psi_id=?",
                           (APPLIED, row.request.psi_id))
                if row.state != PsiState.HELD.value:
                    continue
                who = row.decided_by or "steward"
                if row.steward == REJECTED:
                    reason = f"refused by the site's data steward ({who})" + (
                        f": {row.reason}" if row.reason else "")
                    self.audit("steward.psi_refused", row.request.psi_id, steward=who,
                               reason=row.reason)
                    self._settle(db, row.request, PsiState.REFUSED, reason)
                else:
                    self.audit("steward.psi_approved", row.request.psi_id, steward=who)
                    self._approve(db, row.request, f"data steward {who}")
        if rows:
            self.wake_outbox()
        return len(rows)

    def _approve(self, db: sqlite3.Connection, request: PsiRequest, by: str) -> None:
        """Snapshot the identifiers, make the secrets, say hello to each partner."""
        try:
            mapping = self.identifiers()
        except NoIdentifiers as exc:
            self._settle(db, request, PsiState.REFUSED, str(exc))
            return
        items = sorted(mapping)
        partners = request.partners_of(self.me)
        secrets = {"exchange": {p: crypto.b64(crypto.new_exchange_key()) for p in partners}}
        if self.me == request.leader:
            secrets["link"] = crypto.b64(os.urandom(32))
        db.execute("UPDATE psi_requests SET state=?, items=?, secrets=? WHERE psi_id=?",
                   (PsiState.APPROVED.value, json.dumps(items), json.dumps(secrets),
                    request.psi_id))
        self.audit("psi.approved", request.psi_id, by=by, identifiers=len(items))
        self._status(db, request, PsiState.APPROVED)
        for peer in partners:
            db.execute("INSERT OR IGNORE INTO psi_peers (psi_id, peer) VALUES (?, ?)",
                       (request.psi_id, peer))
            payload = crypto.hello(self.key, crypto.unb64(secrets["exchange"][peer]),
                                   request.psi_id, self.me, peer)
            self._relay(db, request, peer, PsiStep.HELLO, payload)

    # -- relayed messages ---------------------------------------------------------------------
    def work(self) -> int:
        """Process the relayed messages of approved PSIs, oldest first, each in one
        transaction with what it sends. Returns how many were processed."""
        done = 0
        while True:
            with self.journal.transaction() as db:
                pending = db.execute(
                    "SELECT i.seq, i.message FROM psi_inbox i JOIN psi_requests r "
                    "ON r.psi_id = i.psi_id WHERE i.processed = 0 AND r.state = ? "
                    "ORDER BY i.seq LIMIT 1", (PsiState.APPROVED.value,)).fetchone()
                if pending is None:
                    # relayed messages for PSIs that finished, failed or were refused
                    db.execute("UPDATE psi_inbox SET processed = 2 WHERE processed = 0 AND "
                               "psi_id IN (SELECT psi_id FROM psi_requests WHERE state "
                               "IN (?, ?, ?))", (PsiState.DONE.value, PsiState.FAILED.value,
                                                 PsiState.REFUSED.value))
                    break
                seq, text = pending
                forward = PsiForward.model_validate_json(text)
                row = read_psi(db, forward.psi_id)
                assert row is not None
                try:
                    self._step(db, row, forward)
                except (PsiAbort, crypto.PsiCryptoError, NoIdentifiers, LinkageExists) as exc:
                    log.warning("PSI %s failed: %s", forward.psi_id, exc)
                    self._settle(db, row.request, PsiState.FAILED, str(exc))
                except Exception as exc:  # a hostile payload must not stop the spoke's work
                    log.exception("PSI %s failed on a relayed %s", forward.psi_id,
                                  forward.step.value)
                    self._settle(db, row.request, PsiState.FAILED,
                                 f"the spoke could not process a {forward.step.value}: "
                                 f"{type(exc).__name__}")
                db.execute("UPDATE psi_inbox SET processed = 1 WHERE seq = ?", (seq,))
            done += 1
            self.wake_outbox()
        return done

    def _step(self, db: sqlite3.Connection, row: PsiRow, forward: PsiForward) -> None:
        request, sender = row.request, forward.from_spoke
        if sender not in request.partners_of(self.me):
            raise PsiAbort(f"{sender} is not a partner of this spoke in the PSI")
        leader = self.me == request.leader
        expected = {PsiStep.HELLO, PsiStep.RESPONSE} if leader else {
            PsiStep.HELLO, PsiStep.REQUEST, PsiStep.LINK}
        if forward.step not in expected:
            raise PsiAbort(f"unexpected {forward.step.value} from {sender}")
        self.audit("psi.step", request.psi_id, step=forward.step.value, from_spoke=sender,
                   size=len(forward.payload))
        if forward.step == PsiStep.HELLO:
            self._hello(db, row, forward)
            return
        key = self._pair_key(db, row, sender)
        data = crypto.decrypt(key, forward.payload, request.psi_id, sender, self.me,
                              forward.step.value)
        if forward.step == PsiStep.REQUEST:
            self._answer(db, row, sender, key, data)
        elif forward.step == PsiStep.RESPONSE:
            self._pair_result(db, row, sender, data)
        else:
            self._link(db, row, data)

    def _hello(self, db: sqlite3.Connection, row: PsiRow, forward: PsiForward) -> None:
        request, sender = row.request, forward.from_spoke
        peer_pem = request.key_of(sender)
        assert peer_pem is not None
        public = crypto.open_hello(forward.payload, peer_pem, request.psi_id, sender, self.me)
        db.execute("UPDATE psi_peers SET peer_public=? WHERE psi_id=? AND peer=?",
                   (crypto.b64(public), request.psi_id, sender))
        if self.me != request.leader:
            return
        client_key, blinded = crypto.client_request(row.items or [], reveals(request))
        db.execute("UPDATE psi_peers SET client_key=? WHERE psi_id=? AND peer=?",
                   (crypto.b64(client_key), request.psi_id, sender))
        key = self._pair_key(db, row, sender)
        self._relay(db, request, sender, PsiStep.REQUEST, crypto.encrypt(
            key, blinded, request.psi_id, self.me, sender, PsiStep.REQUEST.value))

    def _pair_key(self, db: sqlite3.Connection, row: PsiRow, peer: str) -> bytes:
        found = db.execute("SELECT peer_public FROM psi_peers WHERE psi_id=? AND peer=?",
                           (row.request.psi_id, peer)).fetchone()
        if found is None or found[0] is None:
            raise PsiAbort(f"{peer} sent a PSI message before its hello")
        leader = row.request.leader
        partner = peer if self.me == leader else self.me
        return crypto.pair_key(crypto.unb64(row.secrets["exchange"][peer]),
                               crypto.unb64(found[0]), row.request.psi_id, leader, partner)

    def _answer(self, db: sqlite3.Connection, row: PsiRow, leader: str, key: bytes,
                blinded: bytes) -> None:
        request = row.request
        answer = json.loads(crypto.server_answer(row.items or [], blinded, reveals(request)))
        answer["k"] = self.config.counts.min_cell  # the leader suppresses under every site's k
        answer = json.dumps(answer).encode()
        self._relay(db, request, leader, PsiStep.RESPONSE, crypto.encrypt(
            key, answer, request.psi_id, self.me, leader, PsiStep.RESPONSE.value))
        if request.mode == PsiMode.CARDINALITY:
            self._settle(db, request, PsiState.DONE, None)  # a partner learns nothing

    def _pair_result(self, db: sqlite3.Connection, row: PsiRow, partner: str,
                     answer: bytes) -> None:
        request = row.request
        found = db.execute("SELECT client_key, result FROM psi_peers WHERE psi_id=? AND "
                           "peer=?", (request.psi_id, partner)).fetchone()
        if found is None or found[0] is None or found[1] is not None:
            raise PsiAbort(f"unexpected response from {partner}")
        result = crypto.client_result(crypto.unb64(found[0]), reveals(request), answer)
        try:
            k = int(json.loads(answer)["k"])
        except (ValueError, KeyError, TypeError):
            raise PsiAbort(f"the response of {partner} names no k") from None
        if not 1 <= k <= 1000:
            raise PsiAbort(f"the response of {partner} names an impossible k")
        db.execute("UPDATE psi_peers SET result=? WHERE psi_id=? AND peer=?",
                   (json.dumps({"result": result, "k": k}), request.psi_id, partner))
        rows = db.execute("SELECT result FROM psi_peers WHERE psi_id=?",
                          (request.psi_id,)).fetchall()
        if any(r[0] is None for r in rows):
            return
        pairs = [json.loads(r[0]) for r in rows]
        self._finish_leader(db, row, [p["result"] for p in pairs],
                            max([self.config.counts.min_cell, *(p["k"] for p in pairs)]))

    def _finish_leader(self, db: sqlite3.Connection, row: PsiRow,
                       results: list[list[int] | int], k: int) -> None:
        """Intersect the pairwise results; ``k`` is the largest small-cell threshold of
        the participants (each partner states its own in its response)."""
        request, items = row.request, row.items or []
        if not reveals(request):
            size = int(results[0])  # type: ignore[arg-type]
            self._done(db, request, size, k)
            return
        shared = set(range(len(items)))
        for indices in results:
            shared &= set(indices)  # type: ignore[arg-type]
        size = len(shared)
        if request.mode == PsiMode.CARDINALITY:
            self._done(db, request, size, k)
            return
        link: dict[str, Any] = {"suppressed": size < k}
        if size >= k:
            key = crypto.link_key(crypto.unb64(row.secrets["link"]), request.psi_id)
            mapping = self.identifiers()
            table = {crypto.pseudonym(key, items[i]): mapping[items[i]] for i in shared
                     if items[i] in mapping}
            if len(table) != size:
                raise PsiAbort("the site's identifiers changed during the PSI")
            self._save_linkage(request.psi_id, table)
            link.update(key=crypto.b64(key), pseudonyms=sorted(table))
        data = json.dumps(link).encode()
        for partner in request.partners_of(self.me):
            pair = self._pair_key(db, row, partner)
            self._relay(db, request, partner, PsiStep.LINK, crypto.encrypt(
                pair, data, request.psi_id, self.me, partner, PsiStep.LINK.value))
        self._done(db, request, size, k)

    def _link(self, db: sqlite3.Connection, row: PsiRow, data: bytes) -> None:
        request = row.request
        k = self.config.counts.min_cell
        try:
            link = json.loads(data)
            if link.get("suppressed"):
                self._done(db, request, 0, max(k, 1), suppressed=True)
                return
            key, pseudonyms = crypto.unb64(link["key"]), list(link["pseudonyms"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PsiAbort("the link message does not parse") from None
        held = set(row.items or [])  # the snapshot taken at approval, built once
        mine = {crypto.pseudonym(key, identifier): case
                for identifier, case in self.identifiers().items() if identifier in held}
        unknown = [p for p in pseudonyms if p not in mine]
        if unknown:
            raise PsiAbort(f"{len(unknown)} shared pseudonyms match no patient here")
        if len(pseudonyms) < k:
            self._done(db, request, len(pseudonyms), k)  # kept nothing: below this site's k
            return
        self._save_linkage(request.psi_id, {p: mine[p] for p in pseudonyms})
        self._done(db, request, len(pseudonyms), k)

    def _save_linkage(self, psi_id: str, table: dict[str, str]) -> None:
        with Linkage(self.config.work_dir) as linkage:
            linkage.save(psi_id, table)
        self.audit("psi.linked", psi_id, cases=len(table))

    # -- states and messages ------------------------------------------------------------------
    def _done(self, db: sqlite3.Connection, request: PsiRequest, size: int, k: int,
              suppressed: bool = False) -> None:
        """Finish with the size reported under the site's small-cell threshold: the true
        size stays in the spoke's audit log."""
        self.audit("psi.done", request.psi_id, true_size=None if suppressed else size, k=k)
        if suppressed or size < k:
            self._settle(db, request, PsiState.DONE, None, fewer_than=k)
        else:
            self._settle(db, request, PsiState.DONE, None, count=size)

    def _settle(self, db: sqlite3.Connection, request: PsiRequest, state: PsiState,
                reason: str | None, **size: int) -> None:
        db.execute("UPDATE psi_requests SET state=? WHERE psi_id=?",
                   (state.value, request.psi_id))
        if state in (PsiState.REFUSED, PsiState.FAILED):
            self.audit(f"psi.{state.value}", request.psi_id, reason=reason)
        self._status(db, request, state, reason=reason, **size)

    def _status(self, db: sqlite3.Connection, request: PsiRequest, state: PsiState,
                reason: str | None = None, **size: int) -> None:
        cut = reason[:2000] if reason is not None else None  # a steward's words may be long
        Journal.enqueue(db, self.seal(PsiStatus(psi_id=request.psi_id, spoke_id=self.me,
                                                state=state, reason=cut, **size)))

    def _relay(self, db: sqlite3.Connection, request: PsiRequest, to: str, step: PsiStep,
               payload: str) -> None:
        if len(payload) > MAX_PAYLOAD_CHARS:
            raise PsiAbort(f"the {step.value} for {to} would exceed the relay's "
                           f"{MAX_PAYLOAD_CHARS} characters: too many identifiers")
        message = PsiRelay(psi_id=request.psi_id, spoke_id=self.me, to_spoke=to, step=step,
                           payload=payload)
        Journal.enqueue(db, self.seal(message))
        self.audit("psi.relayed_out", request.psi_id, step=step.value, to_spoke=to,
                   size=len(payload), message_id=message.message_id)
