"""The results consumer, one of the hub's three entry points (beside the web app,
:mod:`tributary.hub.main`, and the aggregation worker, :mod:`tributary.hub.worker`): it
takes what spokes send off the results queue and stores it through
:mod:`tributary.hub.services.ingest`, acknowledging a message only once it is stored.

The web app runs one in its own process by default (``TRIBUTARY_HUB_CONSUME_RESULTS``);
an operator who wants it apart runs :func:`run` as a process of its own and turns that
setting off for the web app."""

from __future__ import annotations

import logging
import signal
import threading
import time

from sqlalchemy.engine import Engine
from sqlmodel import Session

from tributary.hub import worker
from tributary.hub.db import open_database
from tributary.hub.models import QuarantinedMessage
from tributary.hub.services import audit, debounce, gaps
from tributary.hub.services.enrolment import resolve_key
from tributary.hub.services.ingest import SpokeMessage, ingest
from tributary.hub.settings import HubSettings
from tributary.protocol.broker import Delivery, StompClient
from tributary.protocol.destinations import results_queue
from tributary.protocol.messages import ExperimentStatusMessage, ProtocolError, ResultMessage
from tributary.protocol.signing import PublicKey, SigningKey
from tributary.protocol.wire import open_from_spoke

log = logging.getLogger(__name__)

#: Attempts to store a message before a database fault sends it to the dead-letter queue.
STORE_ATTEMPTS = 4
#: How often the hub looks for custody gaps whose resend request is due again.
RESEND_POLL_SECONDS = 5.0


class ResultsConsumer:
    """Consumes the results queue; acknowledges a message only once it is stored."""

    def __init__(self, engine: Engine, client: StompClient,
                 key: SigningKey | None = None) -> None:
        self.engine = engine
        self.client = client
        self.key = key  # signs resend requests for custody gaps (none: gaps wait)
        self.queue = results_queue(client.settings.federation)
        self._gap_wake = threading.Event()

    def start(self) -> None:
        self.client.subscribe(self.queue, self.handle)
        if self.key is not None:
            threading.Thread(target=self._resend_loop, name="custody-gaps", daemon=True).start()

    def _resolve(self, keyid: str) -> tuple[str, PublicKey] | None:
        with Session(self.engine) as session:
            return resolve_key(session, keyid)

    def handle(self, delivery: Delivery) -> None:
        claimed: str | None = None
        if delivery.redelivered:  # another consumer took it and died before acknowledging
            log.info("redelivered message %s: storing it unless it already is",
                     delivery.message_id)
        try:
            message, _keyid = open_from_spoke(delivery.body, self._resolve)
            claimed = message.spoke_id
            self._store(message)
        except gaps.GapDetected as exc:
            self._gap(exc)
            self._dead_letter(delivery, str(exc), claimed)
            return
        except ProtocolError as exc:
            self._dead_letter(delivery, str(exc), claimed)
            return
        except Exception as exc:
            log.exception("could not store message %s", delivery.message_id)
            self._dead_letter(delivery, f"hub could not store the message: {exc}", claimed)
            return
        self.client.ack(delivery)
        if isinstance(message, ResultMessage | ExperimentStatusMessage):
            self._gap_wake.set()

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
        while True:
            self._gap_wake.wait(RESEND_POLL_SECONDS)
            self._gap_wake.clear()
            try:
                with Session(self.engine) as session:
                    for spoke_id in gaps.spokes_with_open_gaps(session):
                        gaps.request_resends(session, self.client, self.key, spoke_id)
            except Exception:
                log.exception("could not ask spokes to resend missing custody records")

    def _store(self, message: SpokeMessage) -> None:
        """Ingest, retrying a database fault (a locked SQLite file, a dropped connection)
        a few times before giving up on the message."""
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                with Session(self.engine) as session:
                    ingest(session, message)
                return
            except ProtocolError:
                raise
            except Exception:
                if attempt == STORE_ATTEMPTS:
                    raise
                log.warning("storing %s failed (attempt %d); retrying", message.message_id,
                            attempt, exc_info=True)
                time.sleep(0.2 * 2 ** attempt)

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
    try:
        ResultsConsumer(engine, broker, key).start()
        log.info("consuming %s", results_queue(settings.broker_federation))
        while not stop.wait(1.0):  # (a timed wait lets the signal handler run)
            pass
    finally:
        debouncer.stop()
        broker.close()
        engine.dispose()
