"""Reading and settling dead-letter queues over STOMP, without losing a message.

ActiveMQ moves a message to ``DLQ.<queue>`` when a consumer rejects it (NACK) or when it
expires unconsumed. Browsing uses ActiveMQ's STOMP queue browser (``browser: true`` on
SUBSCRIBE): it reads a snapshot of the queue, ending with a frame carrying
``browser: end``, and removes nothing. Replaying or discarding one message consumes exactly
that message with a JMS selector on its broker message id (client-individual ack): a
replay first re-publishes the original body to the original queue and waits for the
broker's receipt, and only then acknowledges the dead letter, so a failure at any point
leaves the message in one queue or (harmlessly, receivers deduplicate by message id) in
both, never in neither.
"""

from __future__ import annotations

import contextlib
import queue
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import stomp
from pydantic import BaseModel

from tributary.protocol.broker import BrokerSettings, end_io_loop_on_tls_eof
from tributary.protocol.destinations import DEAD_LETTER_PREFIX

#: Headers the broker sets on delivery; everything else is the sender's and is replayed.
_BROKER_HEADERS = {"ack", "subscription", "message-id", "destination", "content-length",
                   "original-destination", "originalExpiration", "redelivered", "timestamp",
                   "expires", "persistent", "content-type", "receipt"}


class DeadLetterError(RuntimeError):
    """The dead letter could not be read or settled (the message says why)."""


class DeadLetter(BaseModel):
    """One message in a dead-letter queue, as the broker holds it."""

    queue: str
    broker_message_id: str
    original_destination: str
    timestamp: datetime | None
    expired: bool
    size: int
    kind: str | None
    headers: dict[str, str]
    body: str


def is_dead_letter_queue(destination: str) -> bool:
    return destination.removeprefix("/queue/").startswith(DEAD_LETTER_PREFIX)


def original_destination(dlq: str, headers: dict[str, str] | None = None) -> str:
    """Where a dead letter came from: the broker's header, else the DLQ name without its
    prefix (the broker configuration names each DLQ after its queue)."""
    if headers and headers.get("original-destination"):
        return headers["original-destination"]
    return "/queue/" + dlq.removeprefix("/queue/").removeprefix(DEAD_LETTER_PREFIX)


def _dead_letter(dlq: str, frame: stomp.utils.Frame) -> DeadLetter:
    headers = dict(frame.headers)
    body = frame.body if isinstance(frame.body, bytes) else (frame.body or "").encode()
    stamp = headers.get("timestamp", "")
    return DeadLetter(
        queue=dlq, broker_message_id=headers.get("message-id", ""),
        original_destination=original_destination(dlq, headers),
        timestamp=datetime.fromtimestamp(int(stamp) / 1000, UTC) if stamp.isdigit() else None,
        expired=headers.get("originalExpiration", "0") not in ("", "0"),
        size=len(body), kind=headers.get("tributary-kind"), headers=headers,
        body=body.decode("utf-8", errors="replace"))


class _Frames(stomp.ConnectionListener):
    def __init__(self) -> None:
        self.messages: queue.Queue[stomp.utils.Frame] = queue.Queue()
        self.receipts: queue.Queue[str] = queue.Queue()
        self.errors: queue.Queue[str] = queue.Queue()

    def on_message(self, frame: stomp.utils.Frame) -> None:
        self.messages.put(frame)

    def on_receipt(self, frame: stomp.utils.Frame) -> None:
        self.receipts.put(frame.headers.get("receipt-id", ""))

    def on_error(self, frame: stomp.utils.Frame) -> None:
        self.errors.put(frame.headers.get("message", "broker error"))


@contextmanager
def _connection(settings: BrokerSettings) -> Iterator[tuple[stomp.Connection12, _Frames]]:
    conn = stomp.Connection12([(settings.host, settings.port)], reconnect_attempts_max=1,
                              heartbeats=(0, 0), timeout=5, auto_decode=False)
    if settings.ca_file or settings.cert_file:
        conn.set_ssl(for_hosts=[(settings.host, settings.port)],
                     ca_certs=str(settings.ca_file) if settings.ca_file else None,
                     cert_file=str(settings.cert_file) if settings.cert_file else None,
                     key_file=str(settings.key_file) if settings.key_file else None)
        end_io_loop_on_tls_eof(conn)
    frames = _Frames()
    conn.set_listener("dead-letters", frames)
    password = settings.password.get_secret_value() if settings.password else None
    try:
        conn.connect(settings.user, password, wait=True)
    except Exception as exc:
        raise DeadLetterError(f"cannot reach the broker at {settings.host}:{settings.port}: "
                              f"{exc}") from None
    try:
        yield conn, frames
    finally:
        with contextlib.suppress(Exception):  # already gone: nothing is lost
            conn.disconnect()


def browse(settings: BrokerSettings, dlq: str, limit: int = 1000,
           timeout: float = 10.0) -> list[DeadLetter]:
    """The messages in ``dlq``, oldest first, without consuming any."""
    found: list[DeadLetter] = []
    with _connection(settings) as (conn, frames):
        conn.subscribe(dlq, id="browse", ack="auto", headers={"browser": "true"})
        while len(found) < limit:
            try:
                frame = frames.messages.get(timeout=timeout)
            except queue.Empty:
                raise DeadLetterError(f"the broker did not finish browsing {dlq}") from None
            if frame.headers.get("browser") == "end":
                break
            found.append(_dead_letter(dlq, frame))
        conn.unsubscribe("browse")
    return found


def _take(conn: stomp.Connection12, frames: _Frames, dlq: str, message_id: str,
          timeout: float) -> stomp.utils.Frame:
    if "'" in message_id:
        raise DeadLetterError("invalid broker message id")
    conn.subscribe(dlq, id="take", ack="client-individual",
                   headers={"selector": f"JMSMessageID = '{message_id}'",
                            "activemq.prefetchSize": "1"})
    try:
        return frames.messages.get(timeout=timeout)
    except queue.Empty:
        raise DeadLetterError(f"no message {message_id} in {dlq}") from None


def _confirmed(frames: _Frames, receipt: str, timeout: float) -> None:
    try:
        while frames.receipts.get(timeout=timeout) != receipt:
            pass
    except queue.Empty:
        error = None if frames.errors.empty() else frames.errors.get()
        raise DeadLetterError(f"the broker did not confirm: {error or 'no receipt'}") from None


def replay(settings: BrokerSettings, dlq: str, message_id: str,
           timeout: float = 10.0) -> DeadLetter:
    """Send the dead letter's original body (and sender headers) back to the queue it came
    from, then remove it from ``dlq``. A new broker expiry is not set: the operator chose
    to deliver it."""
    with _connection(settings) as (conn, frames):
        frame = _take(conn, frames, dlq, message_id, timeout)
        letter = _dead_letter(dlq, frame)
        headers: dict[str, Any] = {k: v for k, v in frame.headers.items()
                                   if k not in _BROKER_HEADERS}
        headers.update({"persistent": "true", "tributary-replayed-from": message_id})
        receipt = f"replay-{uuid.uuid4().hex}"
        body = frame.body if isinstance(frame.body, bytes) else (frame.body or "").encode()
        conn.send(letter.original_destination, body, headers=headers, receipt=receipt,
                  content_type=frame.headers.get("content-type"))
        _confirmed(frames, receipt, timeout)
        _acknowledge(conn, frames, frame, timeout)
    return letter


def discard(settings: BrokerSettings, dlq: str, message_id: str,
            timeout: float = 10.0) -> DeadLetter:
    """Remove one dead letter for good (its content is returned, to be recorded)."""
    with _connection(settings) as (conn, frames):
        frame = _take(conn, frames, dlq, message_id, timeout)
        letter = _dead_letter(dlq, frame)
        _acknowledge(conn, frames, frame, timeout)
    return letter


def _acknowledge(conn: stomp.Connection12, frames: _Frames, frame: stomp.utils.Frame,
                 timeout: float) -> None:
    receipt = f"ack-{uuid.uuid4().hex}"
    conn.ack(frame.headers["ack"], receipt=receipt)
    _confirmed(frames, receipt, timeout)
