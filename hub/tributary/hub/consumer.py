"""The results consumer, one of the hub's three entry points (beside the web app,
:mod:`tributary.hub.main`, and the aggregation worker, :mod:`tributary.hub.worker`): it
takes what spokes send off the results queue and stores it through
:mod:`tributary.hub.services.ingest`, acknowledging a message only once it is stored.

Messages are stored in batches: the broker's listener only queues each delivery, and a
thread of the consumer takes what arrived (up to ``results_batch_size``, waiting at most
``results_batch_wait_ms`` after the first), verifies the envelopes, stores them in one
transaction and acknowledges each one after the commit (client-individual acks; the
broker's prefetch is ``results_prefetch_batches`` batches, so the next batch arrives while
one is stored). A message the hub refuses is dead-lettered alone; a batch that fails for another
reason (a database fault) is stored again one message at a time, so one bad message never
takes the others down. Opening a batch (parsing, validating, checking the envelope's and
custody record's signatures: most of a result's CPU) runs in worker processes
(:mod:`tributary.hub.opening`), for the next batch while this one is stored.

The web app runs one in its own process by default (``TRIBUTARY_HUB_CONSUME_RESULTS``);
an operator who wants it apart runs :func:`run` as a process of its own and turns that
setting off for the web app."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from tributary.hub import worker
from tributary.hub.db import open_database
from tributary.hub.models import QuarantinedMessage, SpokeKey
from tributary.hub.opening import EnvelopeOpener, Opened, PendingBatch
from tributary.hub.services import audit, debounce, gaps, psi
from tributary.hub.services.ingest import Outcome, ingest_batch
from tributary.hub.settings import HubSettings
from tributary.protocol.broker import Delivery, StompClient
from tributary.protocol.cohorts.psi import PsiRelay
from tributary.protocol.destinations import results_queue
from tributary.protocol.messages import (
    MAX_MESSAGE_BYTES,
    ExperimentStatusMessage,
    ProtocolError,
    ResultMessage,
)
from tributary.protocol.signing import SigningKey

log = logging.getLogger(__name__)

#: Attempts to store a message before a database fault sends it to the dead-letter queue.
STORE_ATTEMPTS = 4
#: How often the hub looks for custody gaps whose resend request is due again.
RESEND_POLL_SECONDS = 5.0
#: How often messages held for a custody gap are tried again while nothing else arrives.
HELD_RETRY_SECONDS = 0.25


@dataclass(frozen=True)
class _Batch:
    """Deliveries taken together, being opened."""

    deliveries: list[Delivery]
    held_since: dict[int, float]
    pending: PendingBatch


@dataclass
class _Held:
    """A result refused for a custody gap, kept unacknowledged for a while: the records
    before it may be in another consumer's hands (a spoke that does not send its results as
    one message group). The gap is recorded at once, but the spoke is asked to resend only
    once the gap is older than the hold, and the result is dead-lettered only then."""

    delivery: Delivery
    since: float


class ResultsConsumer:
    """Consumes the results queue in batches; acknowledges a message only once it is
    stored (or dead-lettered)."""

    def __init__(self, engine: Engine, client: StompClient, key: SigningKey | None = None,
                 settings: HubSettings | None = None) -> None:
        settings = settings or HubSettings()
        self.engine = engine
        self.client = client
        self.key = key  # signs resend requests for custody gaps (none: gaps wait)
        self.queue = results_queue(client.settings.federation)
        self.batch_size = settings.results_batch_size
        self.batch_wait = settings.results_batch_wait_ms / 1000
        self.prefetch = settings.results_batch_size * settings.results_prefetch_batches
        self.gap_hold = settings.custody_gap_hold_seconds
        self.opener = EnvelopeOpener(settings.results_verify_processes)
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self._held: list[_Held] = []
        self._retry_now = False
        self._stop = threading.Event()
        self._gap_wake = threading.Event()
        self._psi_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Batches stored (or tried) so far, held messages' retries included.
        self.batches = 0

    def start(self) -> ResultsConsumer:
        self._spawn(self._work, "results-ingest")
        self.client.subscribe(self.queue, self._inbox.put, prefetch=self.prefetch)
        if self.key is not None:
            self._spawn(self._resend_loop, "custody-gaps")
            self._spawn(self._relay_loop, "psi-relay")
        return self

    def waiting(self) -> int:
        """Messages the broker delivered that wait for the batch being stored to finish."""
        return self._inbox.qsize()

    def stop(self) -> None:
        """Stop taking messages (those not stored stay unacknowledged: redelivered)."""
        self._stop.set()
        self._gap_wake.set()
        self._psi_wake.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.opener.close()

    def _spawn(self, target: object, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    # -- taking batches -------------------------------------------------------------------
    def _work(self) -> None:
        ahead: _Batch | None = None
        while not self._stop.is_set():
            batch, ahead = ahead or self._begin(self._take()), None
            if batch is None:
                continue
            if self.opener.parallel:  # the next batch, if it arrived, opens meanwhile
                ahead = self._begin(self._take(block=False))
            try:
                self.process(batch)
            except Exception:  # the messages stay unacknowledged; redelivered on reconnect
                log.exception("could not process %d message(s)", len(batch.deliveries))

    def _take(self, block: bool = True) -> tuple[list[Delivery], dict[int, float]]:
        """What arrived (up to a batch, waiting at most the batch wait after the first; not
        at all when held messages are due again at once), then the messages held for a gap,
        with since when each of those is held. Not ``block``: only what has arrived (the
        batch taken ahead; held messages would be tried again without a pause)."""
        wait = (0.0 if self._retry_now or not block else HELD_RETRY_SECONDS if self._held
                else 0.5)
        self._retry_now = False
        taken: list[Delivery] = []
        with contextlib.suppress(queue.Empty):
            taken.append(self._inbox.get(timeout=wait) if wait else self._inbox.get_nowait())
        if taken:
            deadline = time.monotonic() + (self.batch_wait if block else 0.0)
            while len(taken) < self.batch_size:
                remaining = deadline - time.monotonic()
                try:
                    taken.append(self._inbox.get(timeout=remaining) if remaining > 0
                                 else self._inbox.get_nowait())
                except queue.Empty:
                    break
        if not block:  # held ones wait for a taking that paces their retries
            return taken, {}
        # Held ones last: the records they wait for may be among those just taken.
        held, self._held = self._held, []
        return taken + [h.delivery for h in held], {id(h.delivery): h.since for h in held}

    # -- one batch ------------------------------------------------------------------------
    def _begin(self, taken: tuple[list[Delivery], dict[int, float]]) -> _Batch | None:
        """Start opening what was taken (in the opener's processes, if it has any)."""
        deliveries, held_since = taken
        deliveries = [d for d in deliveries if self.client.is_current(d)]  # else redelivered
        if not deliveries:
            return None
        try:
            pending = self.opener.submit([d.body for d in deliveries], self._keys(deliveries))
        except Exception:  # the messages stay unacknowledged; redelivered on reconnect
            log.exception("could not open %d message(s)", len(deliveries))
            return None
        return _Batch(deliveries, held_since, pending)

    def process(self, batch: _Batch) -> None:
        """Verify, store in one transaction, then acknowledge or dead-letter each one (a
        result refused for a custody gap is held instead, up to the gap hold since
        ``held_since[id(delivery)]``)."""
        self.batches += 1
        opened: list[tuple[Delivery, Opened]] = []
        for delivery, outcome in zip(batch.deliveries, batch.pending.result(), strict=True):
            if delivery.redelivered:  # another consumer took it and died before acknowledging
                log.info("redelivered message %s: storing it unless it already is",
                         delivery.message_id)
            if isinstance(outcome, ProtocolError):
                self._dead_letter(delivery, str(outcome), None)
                continue
            opened.append((delivery, outcome))
        outcomes = self._store([item for _, item in opened])
        now, since = time.monotonic(), batch.held_since
        stored_any = wake = False
        for (delivery, item), outcome in zip(opened, outcomes, strict=True):
            message = item.message
            if isinstance(outcome, gaps.GapDetected):
                first = since.get(id(delivery))
                if first is None:  # the gap is recorded at once; its resend request waits
                    self._gap(outcome)
                    first = now
                if now - first < self.gap_hold:
                    self._held.append(_Held(delivery, first))  # tried again with each batch
                    continue
                self._gap(outcome)
                self._dead_letter(delivery, str(outcome), message.spoke_id)
            elif isinstance(outcome, ProtocolError):
                self._dead_letter(delivery, str(outcome), message.spoke_id)
            elif isinstance(outcome, Exception):
                self._dead_letter(delivery, f"hub could not store the message: {outcome}",
                                  message.spoke_id)
            else:
                self.client.ack(delivery)
                stored_any = True
                wake = wake or isinstance(message, ResultMessage | ExperimentStatusMessage)
                if isinstance(message, PsiRelay):
                    self._psi_wake.set()
        # What was held may follow what this batch stored: try it again at once.
        self._retry_now = bool(self._held) and stored_any
        if wake:
            self._gap_wake.set()

    def _keys(self, deliveries: list[Delivery]) -> dict[str, tuple[str, str]]:
        """The active keys of the spokes whose key ids the batch's envelopes name (their
        custody records may be signed by another of the spoke's keys), read with one
        query: key id -> (spoke, PEM). A revoked key is not in it (the envelope is then
        refused)."""
        keyids = set()
        for delivery in deliveries:
            if len(delivery.body) > MAX_MESSAGE_BYTES:
                continue
            try:
                keyids.add(str(json.loads(delivery.body)["signatures"][0]["keyid"]))
            except Exception:  # open_from_spoke will say what is wrong with it
                continue
        known: dict[str, tuple[str, str]] = {}
        if keyids:
            signers = select(SpokeKey.spoke_id).where(col(SpokeKey.keyid).in_(keyids))
            with Session(self.engine) as session:
                for row in session.exec(select(SpokeKey).where(
                        col(SpokeKey.spoke_id).in_(signers), col(SpokeKey.revoked_at).is_(None))):
                    known[row.keyid] = (row.spoke_id, row.public_key_pem)
        return known

    def _store(self, opened: list[Opened]) -> list[Outcome | Exception]:
        """Store the batch in one transaction; if that fails for another reason than a
        refused message, store its messages one at a time to isolate the one at fault."""
        if not opened:
            return []
        if len(opened) > 1:
            try:
                with Session(self.engine) as session:
                    return ingest_batch(session, [item.message for item in opened],
                                        [item.custody for item in opened])
            except Exception:
                log.warning("storing a batch of %d messages failed; storing them one by one",
                            len(opened), exc_info=True)
        return [self._store_one(item) for item in opened]

    def _store_one(self, item: Opened) -> Outcome | Exception:
        """Ingest one message, retrying a database fault (a locked SQLite file, a dropped
        connection) a few times before giving up on it."""
        message = item.message
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                with Session(self.engine) as session:
                    return ingest_batch(session, [message], [item.custody])[0]
            except Exception as exc:
                if attempt == STORE_ATTEMPTS:
                    log.exception("could not store message %s", message.message_id)
                    return exc
                log.warning("storing %s failed (attempt %d); retrying", message.message_id,
                            attempt, exc_info=True)
                time.sleep(0.2 * 2 ** attempt)
        raise AssertionError("unreachable")

    # -- gaps and refusals ----------------------------------------------------------------
    def _gap(self, gap: gaps.GapDetected) -> None:
        with Session(self.engine) as session:
            gaps.record_gap(session, gap)
            session.commit()
        self._gap_wake.set()

    def _resend_loop(self) -> None:
        """Ask spokes for the records of their open gaps, from a thread of its own: a
        publish waits for the broker's receipt, which the consuming thread must be free to
        read. A request that fails is tried again on the next round."""
        assert self.key is not None
        while not self._stop.is_set():
            self._gap_wake.wait(RESEND_POLL_SECONDS)
            self._gap_wake.clear()
            try:
                with Session(self.engine) as session:
                    for spoke_id in gaps.spokes_with_open_gaps(session):
                        gaps.request_resends(session, self.client, self.key, spoke_id,
                                             min_age=timedelta(seconds=self.gap_hold))
            except Exception:
                log.exception("could not ask spokes to resend missing custody records")

    def _relay_loop(self) -> None:
        """Forward what spokes asked the hub to relay for a private set intersection, from
        a thread of its own (a publish waits for the broker's receipt). Kept relays survive
        a restart and are forwarded then; the spokes drop any forwarded twice."""
        assert self.key is not None
        while not self._stop.is_set():
            self._psi_wake.wait(RESEND_POLL_SECONDS)
            self._psi_wake.clear()
            try:
                with Session(self.engine) as session:
                    while psi.forward_pending(session, self.client, self.key):
                        pass
            except Exception:
                log.exception("could not forward PSI messages; will retry")

    def _dead_letter(self, delivery: Delivery, reason: str, claimed: str | None) -> None:
        """Keep the refused message aside with its reason, audit it, and move it to the
        results queue's dead-letter queue."""
        log.warning("refusing message %s: %s", delivery.message_id, reason)
        with Session(self.engine) as session:
            session.add(QuarantinedMessage(
                broker_message_id=delivery.message_id, claimed_spoke=claimed, reason=reason,
                body=delivery.body[:256 * 1024].decode("utf-8", errors="replace")))
            audit.record(session, "hub", "message.rejected", self.queue,
                         broker_message_id=delivery.message_id, reason=reason,
                         spoke=claimed, size=len(delivery.body))
            session.commit()
        self.client.nack(delivery)


def run(settings: HubSettings | None = None, stop: threading.Event | None = None) -> None:
    """Consume the results queue until SIGTERM or SIGINT (or until ``stop`` is set, for a
    caller that is not the main thread). Aggregation tasks run in this process unless a
    Celery broker is configured, as they do in the web app's; so does this process's debouncer,
which recomputes (or enqueues) stale aggregates at most once per interval."""
    settings = settings or HubSettings()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    engine = open_database(settings)
    key = SigningKey.load_or_create(settings.signing_key)
    worker.configure(settings, engine)
    broker = StompClient(settings.broker(), "hub-consumer").start()
    debouncer = debounce.start(settings, engine)  # stale aggregates, off the consumer
    consumer = ResultsConsumer(engine, broker, key, settings)
    try:
        consumer.start()
        log.info("consuming %s", results_queue(settings.broker_federation))
        while not stop.wait(1.0):  # (a timed wait lets the signal handler run)
            pass
    finally:
        consumer.stop()
        debouncer.stop()
        broker.close()
        engine.dispose()
