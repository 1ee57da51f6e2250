"""Publishing the site's description (the federated catalog) to the hub: at start, then
whenever it changed, checked every ``[catalog] description_check_seconds`` and after the
agent's own ingests (an ingest run from the command line is seen at the next check).

Each description is signed by the spoke's key, audited in the spoke's log (with the true
total, which stays here) and put in the durable outbox like every other message, so it
survives a broker or hub outage. A change is published only when needed: an identical
description (same digest) is never sent again, and a change of counts alone waits until
the site's number of cases has moved by at least k since the last one sent, so two
successive descriptions never differ by fewer than k cases (a difference of one case
would tell which cells that one patient is in)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from tributary.protocol.cohorts.catalog import COUNT_FIELDS, SpokeDescription, sign_description
from tributary.protocol.signing import SigningKey
from tributary.spoke.config import SpokeConfig
from tributary.spoke.custody import outgoing
from tributary.spoke.description import describe
from tributary.spoke.ingest import open_catalog

if TYPE_CHECKING:
    from tributary.spoke.lifecycle import Lifecycle

log = logging.getLogger(__name__)

STATE_FILE = "catalog-description.json"


class PublishedState(BaseModel):
    """What the spoke last sent (its private work folder): the digest, the content, and
    the true number of cases then (which never leaves)."""

    model_config = ConfigDict(extra="forbid")

    digest: str
    content: dict[str, Any]
    true_cases: int


def decide(previous: PublishedState | None, description: SpokeDescription, true_cases: int,
           k: int) -> str | None:
    """Why ``description`` should be published now, or None to keep the last one."""
    if previous is None:
        return "first description"
    if previous.digest == description.digest():
        return None
    content = description.content()
    if any(content.get(name) != previous.content.get(name)
           for name in set(content) | set(previous.content) if name not in COUNT_FIELDS):
        return "policy or profile changed"
    if abs(true_cases - previous.true_cases) >= k:
        return "cases changed by at least k"
    return None


class CatalogPublisher:
    """The spoke's description publisher: :meth:`check` once, or :meth:`start` a thread
    that checks at start and then periodically (and when :meth:`wake` is called)."""

    def __init__(self, config: SpokeConfig, lifecycle: Lifecycle, key: SigningKey,
                 stopping: threading.Event) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.key = key
        self.stopping = stopping
        self.state_path: Path = config.work_dir / STATE_FILE
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="catalog", daemon=True)

    def start(self) -> None:
        if self.config.catalog.publish_description:
            self._thread.start()

    def wake(self) -> None:
        """The catalog may have changed (an ingest ran): check now."""
        self._wake.set()

    def join(self, timeout: float) -> None:
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.check()
            except Exception:
                log.exception("could not check the catalog description; will retry")
            self._wake.wait(self.config.catalog.description_check_seconds)
            self._wake.clear()

    def previous(self) -> PublishedState | None:
        try:
            return PublishedState.model_validate_json(self.state_path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("%s is unreadable: the description will be sent again",
                        self.state_path)
            return None

    def check(self) -> bool:
        """Publish the description if it must be; True if one was queued for the hub."""
        with open_catalog(self.config) as catalog:
            description = describe(self.config, catalog)
            true_cases = len(catalog.cases())
        previous = self.previous()
        reason = decide(previous, description, true_cases, self.config.counts.min_cell)
        if reason is None:
            return False
        message = sign_description(description, self.key)
        # Audited before it is queued: the log says what left, and why, before it leaves.
        self.lifecycle.audit(
            "catalog.described", self.config.spoke_id, reason=reason, digest=message.digest,
            message_id=message.message_id, true_cases=true_cases,
            published=description.content())
        self.lifecycle.journal.send_later(outgoing(message, self.key))
        self.lifecycle.wake_outbox()
        self._save(PublishedState(digest=message.digest, content=description.content(),
                                  true_cases=true_cases))
        log.info("catalog description %s queued for the hub (%s)", message.digest[:19],
                 reason)
        return True

    def _save(self, state: PublishedState) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.state_path.parent, prefix=".tmp-catalog-")
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(state.model_dump(mode="json")))
        os.replace(tmp, self.state_path)
