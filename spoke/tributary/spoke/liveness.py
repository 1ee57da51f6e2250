"""What a spoke tells the hub about itself while it works: heartbeats and case progress.

Both are *ephemeral*: sent non-persistent with a broker expiry, never journaled. A lost
heartbeat or progress message is superseded by the next one, and none pile up on the
broker while the hub is away. (Results and statuses, which must never be lost, go through
the journal's outbox instead.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tributary.protocol.broker import PublishError, StompClient
from tributary.protocol.contract import MAX_PROGRESS_REPORTS_PER_CASE, Progress
from tributary.protocol.messages import (
    CaseProgressMessage,
    CertificateStatus,
    HeartbeatMessage,
    RunningCase,
)
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal
from tributary.spoke.journal import CaseRow

log = logging.getLogger(__name__)


def certificate_status(cert_file: Path | None) -> CertificateStatus | None:
    """Serial and expiry of the certificate the spoke connects with, read afresh for each
    heartbeat so that a rotated certificate shows at the hub as soon as it is in place;
    None without mutual TLS or when the file cannot be read (the heartbeat still goes)."""
    if cert_file is None:
        return None
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError) as exc:
        log.warning("cannot read the broker certificate %s: %s", cert_file, exc)
        return None
    return CertificateStatus(serial=format(cert.serial_number, "x"),
                             not_after=cert.not_valid_after_utc)


def send_ephemeral(client: StompClient, destination: str, key: SigningKey,
                   message: CaseProgressMessage | HeartbeatMessage, ttl_seconds: float) -> bool:
    """Publish now if connected, else drop; True if the broker confirmed it."""
    if not client.connected:
        return False
    expires = int((time.time() + ttl_seconds) * 1000)
    try:
        client.publish(destination, seal(message, key),
                       {"tributary-kind": message.kind, "persistent": "false",
                        "expires": str(expires)}, wait_connected=0.1)
    except PublishError as exc:
        log.debug("%s not sent: %s", message.kind, exc)
        return False
    return True


@dataclass
class CaseActivity:
    """A case that is running now: what heartbeats report and how cancellation reaches
    its container."""

    experiment_id: str
    case_id: str
    attempt: int
    started_at: datetime
    cancel: threading.Event = field(default_factory=threading.Event)
    #: The last progress *sent* (heartbeats repeat it and never anything newer, so they
    #: add nothing to what the progress messages already carried and the audit log holds).
    progress: Progress | None = None
    progress_sent_at: float = 0.0
    progress_reports: int = 0

    def as_running(self) -> RunningCase:
        return RunningCase(
            experiment_id=self.experiment_id, case_id=self.case_id, attempt=self.attempt,
            started_at=self.started_at,
            fraction=self.progress.fraction if self.progress else None,
            message=self.progress.message if self.progress else None)


class RunningCases:
    """The cases running now, at most ``limit``: the dispatcher claims into it, the case
    workers leave it, cancellations and heartbeats look into it from other threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._cases: dict[tuple[str, str], CaseActivity] = {}
        self._lock = threading.Lock()

    def claim(self, claim_next: Callable[[], CaseRow | None]
              ) -> tuple[CaseRow, CaseActivity] | None:
        """Take the next queued case from ``claim_next`` if a slot is free; None if the
        slots are full or nothing is queued."""
        with self._lock:
            if len(self._cases) >= self.limit:
                return None
            row = claim_next()
            if row is None:
                return None
            activity = CaseActivity(row.experiment_id, row.case_id, row.attempt,
                                    datetime.now(UTC))
            self._cases[(row.experiment_id, row.case_id)] = activity
            return row, activity

    def leave(self, experiment_id: str, case_id: str) -> None:
        with self._lock:
            self._cases.pop((experiment_id, case_id), None)

    def now(self) -> list[CaseActivity]:
        with self._lock:
            return list(self._cases.values())

    def cancel_all(self) -> None:
        """Stop every container (at shutdown: their cases run again at the next start)."""
        with self._lock:
            for activity in self._cases.values():
                activity.cancel.set()


#: Records a progress message in the spoke's audit log before it is sent.
AuditProgress = Callable[[CaseActivity, CaseProgressMessage], None]


class ProgressReporter:
    """Forwards an algorithm's progress to the hub: only a rounded fraction and a word of
    the protocol's vocabulary (the contract's :class:`Progress` admits nothing else), only
    when that changed, at most once per ``interval`` and :data:`MAX_PROGRESS_REPORTS_PER_CASE`
    times per case, each audited; and nothing at all when ``enabled`` is false (the site's
    steward reviews results: no byte of the algorithm's may leave before that review)."""

    def __init__(self, client: StompClient, destination: str, key: SigningKey, spoke_id: str,
                 interval: float, audit: AuditProgress | None = None,
                 enabled: bool = True) -> None:
        self.client, self.destination, self.key = client, destination, key
        self.spoke_id = spoke_id
        self.interval = interval
        self.audit = audit
        self.enabled = enabled

    def report(self, activity: CaseActivity, progress: Progress) -> bool:
        """Send ``progress`` if the bounds allow; True if it was sent."""
        if not self.enabled or activity.progress_reports >= MAX_PROGRESS_REPORTS_PER_CASE:
            return False
        if progress == activity.progress:
            return False
        now = time.monotonic()
        if activity.progress_reports and now - activity.progress_sent_at < self.interval:
            return False
        message = CaseProgressMessage(
            experiment_id=activity.experiment_id, spoke_id=self.spoke_id,
            case_id=activity.case_id, attempt=activity.attempt, fraction=progress.fraction,
            message=progress.message)
        # Audited before it goes, and counted whether or not the broker confirms it: the
        # bytes may have left all the same.
        if self.audit is not None:
            self.audit(activity, message)
        activity.progress_reports += 1
        activity.progress_sent_at = now
        activity.progress = progress
        send_ephemeral(self.client, self.destination, self.key, message,
                       ttl_seconds=max(60.0, 10 * self.interval))
        return True


class Heartbeat:
    """Sends a heartbeat every ``interval`` seconds from its own thread, and at once when
    ``watch`` (checked every second) returns something else than at the last heartbeat: a
    steward's trust decision reaches the hub within a second or two."""

    def __init__(self, client: StompClient, destination: str, key: SigningKey,
                 interval: float, snapshot: Callable[[], HeartbeatMessage],
                 watch: Callable[[], object] | None = None) -> None:
        self.client, self.destination, self.key = client, destination, key
        self.interval = interval
        self.snapshot = snapshot
        self.watch = watch
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=20)

    def _watched(self) -> object:
        try:
            return self.watch() if self.watch is not None else None
        except Exception:
            log.exception("could not check what the heartbeat watches")
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = False
            seen = self._watched()
            try:
                sent = send_ephemeral(self.client, self.destination, self.key, self.snapshot(),
                                      ttl_seconds=3 * self.interval)
            except Exception:
                log.exception("could not send a heartbeat")
            if sent:
                self.sent += 1
            # Not sent (broker away): try again soon, so the hub hears of the spoke as soon
            # as the connection is back rather than an interval later.
            deadline = time.monotonic() + (self.interval if sent else min(1.0, self.interval))
            while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
                if self._stop.wait(min(1.0, left)) or self._watched() != seen:
                    break
