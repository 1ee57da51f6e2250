"""STOMP transport to ActiveMQ used by both hub and spoke.

stomp.py does not reconnect after a dropped connection on its own; this wrapper does, with
exponential backoff, and re-creates every subscription. Messages are always sent
persistent and with a receipt, so :meth:`StompClient.publish` returns only once the broker
has taken responsibility for the message. Consumption is client-individual with prefetch 1:
one unacknowledged message in flight per consumer, redelivered if we die before acking
(a consumer that stores messages in batches, the hub's, asks for a larger prefetch).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import stomp
import stomp.exception
from pydantic import BaseModel, SecretStr, field_validator

log = logging.getLogger(__name__)
_RECV_BYTES = 8192


class BrokerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 61613
    user: str | None = None
    password: SecretStr | None = None
    heartbeat_ms: int = 10_000
    receipt_timeout_s: float = 15.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    #: Mutual TLS for a ``stomp+ssl`` connector: the CA that signed the broker's certificate,
    #: and this client's certificate and key (its identity). TLS is on when ``ca_file`` or
    #: ``cert_file`` is set.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: The namespace of every queue name (see :mod:`tributary.protocol.destinations`).
    federation: str = "tributary"

    @field_validator("federation")
    @classmethod
    def _federation(cls, value: str) -> str:
        from tributary.protocol.destinations import validate_federation

        return validate_federation(value)


class PublishError(RuntimeError):
    """The broker did not confirm a message; it must be considered unsent."""


@dataclass(frozen=True)
class Delivery:
    """One message handed to a consumer, with what is needed to ack or nack it."""

    destination: str
    body: bytes
    headers: dict[str, str]
    ack_id: str
    generation: int

    @property
    def redelivered(self) -> bool:
        return self.headers.get("redelivered") == "true"

    @property
    def message_id(self) -> str:
        return self.headers.get("message-id", "")


Handler = Callable[[Delivery], None]


class _Listener(stomp.ConnectionListener):
    def __init__(self, client: StompClient, generation: int) -> None:
        self.client = client
        self.generation = generation

    def on_message(self, frame: stomp.utils.Frame) -> None:
        self.client._dispatch(frame, self.generation)

    def on_receipt(self, frame: stomp.utils.Frame) -> None:
        self.client._receipt(frame.headers.get("receipt-id", ""))

    def on_error(self, frame: stomp.utils.Frame) -> None:
        message = frame.headers.get("message", "")
        log.warning("broker error: %s %s", message, (frame.body or "")[:300])
        self.client._errored(frame.headers.get("receipt-id"), message)

    def on_disconnected(self) -> None:
        self.client._lost(self.generation)

    def on_heartbeat_timeout(self) -> None:
        log.warning("broker heartbeat timed out")


class StompClient:
    """A self-healing STOMP 1.2 connection with its subscriptions."""

    def __init__(self, settings: BrokerSettings, client_name: str) -> None:
        self.settings = settings
        self.client_name = client_name
        self._conn: stomp.Connection12 | None = None
        self._generation = 0
        self._lock = threading.RLock()
        self._send_lock = threading.Lock()
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._subscriptions: dict[str, tuple[str, Handler, int]] = {}
        self._receipts: dict[str, threading.Event] = {}
        self._receipt_errors: dict[str, str] = {}
        self._confirmed: set[str] = set()
        self._ids = itertools.count(1)
        self._supervisor: threading.Thread | None = None
        self.reconnects = 0

    # -- connection lifecycle -------------------------------------------------------------
    def start(self, wait: float | None = None) -> StompClient:
        """Connect (retrying with backoff in the background) and keep reconnecting."""
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"stomp-{self.client_name}", daemon=True
        )
        self._supervisor.start()
        if wait is not None and not self._connected.wait(wait):
            raise ConnectionError(
                f"could not reach the broker at {self.settings.host}:{self.settings.port} "
                f"within {wait:.0f} s"
            )
        return self

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            conn, self._conn = self._conn, None
            self._connected.clear()
        if conn is not None:
            with contextlib.suppress(Exception):  # already gone
                conn.disconnect()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)

    def _supervise(self) -> None:
        delay = self.settings.reconnect_initial_s
        while not self._closing.is_set():
            if self._connected.is_set():
                self._closing.wait(0.5)
                continue
            try:
                self._connect_once()
                delay = self.settings.reconnect_initial_s
            except Exception as exc:
                log.info("broker unreachable (%s); retrying in %.1f s", exc, delay)
                self._closing.wait(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)

    def _connect_once(self) -> None:
        s = self.settings
        conn = stomp.Connection12(
            [(s.host, s.port)],
            heartbeats=(s.heartbeat_ms, s.heartbeat_ms),
            reconnect_attempts_max=1,
            timeout=5,
        )
        with self._lock:
            self._generation += 1
            generation = self._generation
        if s.ca_file or s.cert_file:
            conn.set_ssl(for_hosts=[(s.host, s.port)], ca_certs=_str(s.ca_file),
                         cert_file=_str(s.cert_file), key_file=_str(s.key_file))
            end_io_loop_on_tls_eof(conn)
        conn.set_listener("tributary", _Listener(self, generation))
        password = s.password.get_secret_value() if s.password else None
        conn.connect(
            s.user, password, wait=True,
            headers={"client-id": f"{self.client_name}-{uuid.uuid4().hex[:8]}"},
        )
        with self._lock:
            self._conn = conn
            for destination, (sub_id, _handler, prefetch) in self._subscriptions.items():
                self._subscribe_on(conn, destination, sub_id, prefetch)
            if generation > 1:
                self.reconnects += 1
            self._connected.set()
        log.info("connected to broker %s:%s as %s", s.host, s.port, self.client_name)

    def _lost(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._connected.clear()
            self._conn = None
        for event in list(self._receipts.values()):
            event.set()  # wake publishers; they will see no confirmation
        if not self._closing.is_set():
            log.warning("lost the broker connection; reconnecting")

    # -- consuming ------------------------------------------------------------------------
    def subscribe(self, destination: str, handler: Handler, prefetch: int = 1) -> None:
        """Consume ``destination`` with client-individual acks: at most ``prefetch``
        unacknowledged messages are in flight to this consumer (1 by default)."""
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        with self._lock:
            sub_id = f"sub-{next(self._ids)}"
            self._subscriptions[destination] = (sub_id, handler, prefetch)
            if self._conn is not None and self._connected.is_set():
                self._subscribe_on(self._conn, destination, sub_id, prefetch)

    def unsubscribe(self, destination: str) -> None:
        """Stop consuming ``destination``. Messages delivered and not yet acknowledged go
        back to the queue for its other consumers (or this one, subscribing again)."""
        with self._lock:
            entry = self._subscriptions.pop(destination, None)
            if entry is not None and self._conn is not None and self._connected.is_set():
                with contextlib.suppress(Exception):  # the connection went: nothing to undo
                    self._conn.unsubscribe(id=entry[0])

    @staticmethod
    def _subscribe_on(conn: stomp.Connection12, destination: str, sub_id: str,
                      prefetch: int = 1) -> None:
        conn.subscribe(
            destination, id=sub_id, ack="client-individual",
            headers={"activemq.prefetchSize": str(prefetch)},
        )

    def _dispatch(self, frame: stomp.utils.Frame, generation: int) -> None:
        destination = frame.headers.get("destination", "")
        entry = self._subscriptions.get(destination)
        body = frame.body if isinstance(frame.body, bytes) else (frame.body or "").encode()
        delivery = Delivery(destination, body, dict(frame.headers),
                            frame.headers.get("ack", ""), generation)
        if entry is None:
            log.warning("message for unknown subscription %s", destination)
            return
        try:
            entry[1](delivery)
        except Exception:
            log.exception("handler for %s failed; message stays unacknowledged", destination)

    def is_current(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` came on the live connection (else the broker redelivers it
        on the new one, and settling this copy is impossible)."""
        with self._lock:
            return self._conn is not None and delivery.generation == self._generation

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge; False if the connection it came on is gone (it will be redelivered)."""
        return self._settle(delivery, nack=False)

    def nack(self, delivery: Delivery) -> bool:
        """Reject: ActiveMQ moves the message to the queue's dead-letter queue at once."""
        return self._settle(delivery, nack=True)

    def _settle(self, delivery: Delivery, nack: bool) -> bool:
        with self._lock:
            conn = self._conn
            if conn is None or delivery.generation != self._generation:
                return False
        try:
            with self._send_lock:
                (conn.nack if nack else conn.ack)(delivery.ack_id)
        except stomp.exception.NotConnectedException:
            return False
        return True

    # -- publishing -----------------------------------------------------------------------
    def publish(self, destination: str, body: str, headers: dict[str, str] | None = None,
                wait_connected: float = 30.0) -> None:
        """Send a persistent message and wait until the broker confirms it."""
        if not self._connected.wait(wait_connected):
            raise PublishError(f"not connected to the broker; {destination} message not sent")
        receipt = f"r-{uuid.uuid4().hex}"
        event = threading.Event()
        self._receipts[receipt] = event
        all_headers = {"persistent": "true", **(headers or {})}
        try:
            with self._lock:
                conn = self._conn
            if conn is None:
                raise PublishError("connection lost before sending")
            try:
                with self._send_lock:
                    conn.send(destination, body, content_type="application/json",
                              headers=all_headers, receipt=receipt)
            except stomp.exception.NotConnectedException as exc:
                raise PublishError("connection lost while sending") from exc
            if not event.wait(self.settings.receipt_timeout_s):
                raise PublishError(f"no receipt from the broker for a message to {destination}")
            if receipt in self._receipt_errors:
                raise PublishError(self._receipt_errors.pop(receipt))
            if not self._receipt_confirmed(receipt):
                raise PublishError(f"connection lost before the broker confirmed {destination}")
        finally:
            self._receipts.pop(receipt, None)
            self._confirmed.discard(receipt)

    def _receipt(self, receipt_id: str) -> None:
        self._confirmed.add(receipt_id)
        event = self._receipts.get(receipt_id)
        if event is not None:
            event.set()

    def _receipt_confirmed(self, receipt: str) -> bool:
        return receipt in self._confirmed

    def _errored(self, receipt_id: str | None, message: str) -> None:
        if receipt_id and receipt_id in self._receipts:
            self._receipt_errors[receipt_id] = message or "broker refused the message"
            self._receipts[receipt_id].set()


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def end_io_loop_on_tls_eof(conn: stomp.Connection12) -> None:
    """Make a TLS connection notice that the broker closed it.

    stomp.py 9.0 reads TLS sockets non-blocking and cannot tell "closed" from "no data yet":
    both come back as an empty read, so its I/O thread spins at full CPU and never reports
    the disconnect. A refused handshake then hangs ``connect`` and a broker restart goes
    unnoticed. Reading the socket ourselves keeps the two apart.
    """
    transport = conn.transport

    def receive() -> bytes:
        try:
            data = transport.socket.recv(_RECV_BYTES)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # no data yet: stomp.py waits for the socket
        except (OSError, AttributeError):  # TLS alert, reset, or socket already gone
            data = b""
        if not data:
            transport.running = False  # ends the I/O loop, which reports the disconnect
        return data

    transport.receive = receive


def publish_with_retry(client: StompClient, destination: str, body: str,
                       headers: dict[str, str] | None = None, attempts: int = 5) -> None:
    """Publish, retrying across reconnects. Receivers deduplicate by idempotency key, so a
    message that was in fact delivered before a lost receipt does no harm when sent again."""
    delay = 0.5
    for attempt in range(1, attempts + 1):
        try:
            client.publish(destination, body, headers)
            return
        except PublishError:
            if attempt == attempts:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10)
