"""The sender half of the spoke's durable outbox: one thread publishes journaled messages
to the hub, oldest first, and marks each sent only once the broker has confirmed it. While
the broker is away it waits (with backoff) and loses nothing; after a restart it resumes
where it stopped. A message whose confirmation was lost is sent again with the same bytes
and ``message_id``, which the hub ignores as a duplicate."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from tributary.protocol.broker import PublishError, StompClient
from tributary.spoke.journal import Journal, OutboxRow

log = logging.getLogger(__name__)


class OutboxSender:
    def __init__(self, journal: Journal, client: StompClient, destination: str,
                 on_sent: Callable[[OutboxRow], None], group: dict[str, str] | None = None,
                 backoff_initial: float = 0.5, backoff_max: float = 15.0) -> None:
        self.journal = journal
        self.client = client
        self.destination = destination
        self.on_sent = on_sent
        self.group = group or {}  # the spoke's message group (destinations.results_group)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Something was journaled for the hub: send it now rather than at the next poll."""
        self._wake.set()

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop sending; with ``drain_seconds``, first give unsent messages that long."""
        if drain_seconds > 0 and self.journal.outbox_depth():
            self._wake.set()
            self._idle.clear()
            self._idle.wait(drain_seconds)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        delay = self.backoff_initial
        while not self._stop.is_set():
            pending = self.journal.outbox_pending()
            if not pending:
                self._idle.set()
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            for row in pending:
                if self._stop.is_set():
                    return
                try:
                    self.client.publish(self.destination, row.body,
                                        {**_headers(row), **self.group},
                                        wait_connected=5.0)
                except PublishError as exc:
                    log.info("outbox: %s %s not sent yet (%s); %d waiting, retrying in %.1f s",
                             row.kind, row.message_id, exc, self.journal.outbox_depth(), delay)
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.backoff_max)
                    break  # start again from the oldest: order is kept
                delay = self.backoff_initial
                self.journal.mark_sent(row.seq)
                try:
                    self.on_sent(row)
                except Exception:
                    log.exception("could not record the sending of %s", row.message_id)
                    raise


def _headers(row: OutboxRow) -> dict[str, Any]:
    return {"tributary-kind": row.kind, "tributary-message-id": row.message_id}
