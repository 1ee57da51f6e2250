"""The lifecycle of the spoke's experiments: the one place an experiment's journal state
moves together with the signed status that tells the hub, the spoke's audit log is
written, and the dispatcher is woken. The agent, the case workers, the steward and the
counter each receive this object, so none of them needs another's internals.

An experiment goes ``received`` (or ``held`` for the steward) -> ``accepted`` (its cases
queued) -> ``reviewing`` (results await the steward) -> ``completed``, or ends ``refused``
or ``cancelled``; each move is one journal transaction with its status in the outbox.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from tributary.protocol.auditlog import AuditHead, AuditLog, AuditLogError
from tributary.protocol.messages import (
    CaseStartedMessage,
    CountReply,
    ExperimentState,
    ExperimentStatusMessage,
    ResultMessage,
)
from tributary.protocol.signing import SigningKey
from tributary.spoke import journal as states
from tributary.spoke.custody import outgoing
from tributary.spoke.journal import Journal, Outgoing
from tributary.spoke.steward import StewardDesk

log = logging.getLogger(__name__)

#: What the outbox sends: these are signed by the spoke's key before they are journaled.
Outbound = ExperimentStatusMessage | CaseStartedMessage | CountReply | ResultMessage


class Lifecycle:
    """Journal transitions, audit entries and wake-ups of one spoke. ``wake_outbox`` is
    called whenever something was queued for the hub; ``desk`` is where results and
    experiments wait for the site's steward (emptied when the hub cancels)."""

    def __init__(self, spoke_id: str, journal: Journal, audit_log: AuditLog, key: SigningKey,
                 desk: StewardDesk, wake_outbox: Callable[[], None]) -> None:
        self.spoke_id = spoke_id
        self.journal = journal
        self._audit_log = audit_log
        self._key = key
        self._desk = desk
        self._wake_outbox = wake_outbox
        self._work = threading.Event()
        self._finish_lock = threading.Lock()
        self._on_finished: list[Callable[[str], None]] = []

    # -- the audit log ------------------------------------------------------------------------
    def audit(self, action: str, target: str = "", actor: str | None = None,
              **detail: Any) -> None:
        """Append to the spoke's forensic log; it is fsynced before the spoke goes on, and
        a failure to write stops the work rather than leave it unrecorded."""
        self._audit_log.append(actor or self.spoke_id, action, target, detail)

    def audit_head(self) -> AuditHead | None:
        """The audit log's head for the hub to anchor; None (and logged) if unreadable, so a
        broken log never stops the heartbeats."""
        try:
            return self._audit_log.head()
        except (OSError, ValueError, AuditLogError) as exc:
            log.error("audit log head not sent: %s", exc)
            return None

    # -- wake-ups -----------------------------------------------------------------------------
    def wake(self) -> None:
        """There may be work for the dispatcher: an experiment to prepare, a case to run."""
        self._work.set()

    def wait_for_work(self, timeout: float) -> bool:
        """The dispatcher's pause: True if woken before ``timeout`` seconds passed."""
        woken = self._work.wait(timeout)
        self._work.clear()
        return woken

    def wake_outbox(self) -> None:
        """Something was journaled for the hub: have it sent now."""
        self._wake_outbox()

    # -- messages to the hub ------------------------------------------------------------------
    def outgoing(self, message: Outbound) -> Outgoing:
        """``message`` signed by the spoke, as the journal queues it for the outbox."""
        return outgoing(message, self._key)

    def send_later(self, message: Outbound) -> None:
        """Queue ``message`` for the hub (no state changes with it) and wake the outbox."""
        self.journal.send_later(self.outgoing(message))
        self._wake_outbox()

    # -- experiment states --------------------------------------------------------------------
    def settle(self, experiment_id: str, state: str, status: ExperimentState,
               case_ids: list[str] | None = None, reason: str | None = None,
               queue: list[str] | None = None, expect: str | None = None) -> bool:
        """Move an experiment to ``state`` and, in the same transaction, queue the status
        message that tells the hub and the cases in ``queue`` (only from state ``expect``,
        when given). False if the experiment was not in state ``expect``."""
        message = ExperimentStatusMessage(
            experiment_id=experiment_id, spoke_id=self.spoke_id, state=status,
            case_ids=case_ids or [], reason=reason)
        settled = self.journal.settle_experiment(experiment_id, state, reason,
                                                 self.outgoing(message), queue or [], expect)
        self._wake_outbox()
        return settled

    def on_finished(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(experiment_id)`` when an experiment is completed or cancelled by
        :meth:`maybe_finish` (to let go of what was kept for it)."""
        self._on_finished.append(listener)

    def maybe_finish(self, experiment_id: str) -> None:
        """Send the final status once no case of the experiment is queued or running: or,
        while some results still wait for the steward's review, say so (once)."""
        with self._finish_lock:
            known = self.journal.experiment(experiment_id)
            if known is None or known[1] not in (states.ACCEPTED, states.REVIEWING):
                return
            if self.journal.unfinished(experiment_id):
                return
            cancelled = self.journal.cancellation(experiment_id)
            if cancelled is not None:
                # A result held after the cancellation was processed never leaves either.
                self.journal.cancel(experiment_id, cancelled, "")
                self.discard_held(experiment_id,
                                  f"the hub cancelled the experiment: {cancelled}")
            rows = self.journal.cases(experiment_id)
            held = [r.case_id for r in rows if r.state == states.HELD]
            if cancelled is not None:
                dropped = sorted({r.case_id for r in rows if r.state == states.CANCELLED})
                self.settle(experiment_id, states.CANCELLED, ExperimentState.CANCELLED,
                            dropped, cancelled)
            elif held:
                if known[1] == states.ACCEPTED:
                    self.settle(experiment_id, states.REVIEWING, ExperimentState.HELD,
                                list(dict.fromkeys(r.case_id for r in rows)),
                                f"{len(held)} result(s) await review by the site's data "
                                "steward", expect=states.ACCEPTED)
                    log.info("experiment %s: %d results await the steward", experiment_id,
                             len(held))
                return
            else:
                done = list(dict.fromkeys(r.case_id for r in rows))
                self.settle(experiment_id, states.COMPLETED, ExperimentState.COMPLETED, done)
                log.info("experiment %s done: %d cases", experiment_id, len(done))
            for listener in self._on_finished:
                listener(experiment_id)

    def discard_held(self, experiment_id: str, reason: str) -> None:
        """The hub cancelled the experiment: what waits for the steward never leaves."""
        discarded = self._desk.discard(experiment_id, reason)
        if discarded:
            self.audit("steward.discarded", experiment_id, items=discarded, reason=reason)
