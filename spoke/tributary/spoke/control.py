"""The hub's control of its experiments at this spoke: what each verified message from the
hub does to the journal. A new experiment is journaled (or held for the site's steward);
a cancellation drops its queued cases and stops its running ones; a retry queues cases
again under a new attempt; a resend puts results the hub never received back in the
outbox; a revocation stops every running case of that image. Each ends journaled and
audited before the consumer acknowledges the message."""

from __future__ import annotations

import logging

from tributary.protocol.messages import (
    ApprovalRevokedMessage,
    CancelExperimentMessage,
    ExperimentMessage,
    ExperimentState,
    ExperimentStatusMessage,
    ResendRecordsMessage,
    RetryCasesMessage,
)
from tributary.spoke import journal as states
from tributary.spoke.config import SpokeConfig
from tributary.spoke.lifecycle import Lifecycle
from tributary.spoke.liveness import RunningCases
from tributary.spoke.steward import Steward

log = logging.getLogger(__name__)


class HubControl:
    def __init__(self, config: SpokeConfig, lifecycle: Lifecycle, steward: Steward,
                 running: RunningCases) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.journal = lifecycle.journal
        self.steward = steward
        self.running = running

    def revoke(self, message: ApprovalRevokedMessage) -> None:
        """Nothing runs with a revoked image any more: queued cases fail as not trusted
        when their turn comes, and running containers are stopped now; their cases go back
        to the queue, where the same check fails them with the revocation as reason."""
        self.journal.revoke(message.digest, message.reason)
        stopping = []
        for activity in self.running.now():
            known = self.journal.experiment(activity.experiment_id)
            if known is not None and known[0].algorithm.digest == message.digest:
                activity.cancel.set()
                stopping.append(f"{activity.experiment_id}/{activity.case_id}")
        log.warning("approval of %s %s (%s) revoked: %s; %d running case(s) stopped",
                    message.name, message.version, message.digest, message.reason,
                    len(stopping))
        self.lifecycle.audit("approval.revoked", message.digest, actor="hub",
                             algorithm=f"{message.name} {message.version}", reason=message.reason,
                             stopped=stopping)

    def experiment(self, message: ExperimentMessage, envelope: bytes,
                   delivery_id: str) -> None:
        """Journal a new experiment (or hold it for the steward); a replay is dropped, and
        one the hub cancelled before it arrived is journaled as cancelled."""
        if (self.journal.handled(message.message_id)
                or self.journal.experiment(message.experiment_id) is not None):
            log.warning("dropping replayed experiment message %s (%s): already journaled",
                        message.message_id, message.experiment_id)
            self.lifecycle.audit("message.dropped", message.experiment_id,
                                 message_id=delivery_id, reason="replay: already journaled")
            return
        cancelled = self.journal.cancellation(message.experiment_id)
        if cancelled is not None:  # the cancellation overtook it; the hub was told then
            self.journal.add_experiment(message, states.CANCELLED, cancelled)
            self.lifecycle.audit("experiment.dropped", message.experiment_id,
                                 reason=f"cancelled before it arrived: {cancelled}")
            return
        if self.steward.hold_experiment(message, envelope):
            return  # journaled as held; the hub has been told it awaits the steward
        self.journal.add_experiment(message)
        self.lifecycle.audit("experiment.journaled", message.experiment_id,
                             hub_message_id=message.message_id, image=message.algorithm.reference)

    def cancel(self, message: CancelExperimentMessage) -> None:
        experiment_id = message.experiment_id
        dropped = self.journal.cancel(experiment_id, message.reason, message.message_id)
        stopping = [a for a in self.running.now() if a.experiment_id == experiment_id]
        for activity in stopping:
            activity.cancel.set()  # the case worker kills its container within a second
        known = self.journal.experiment(experiment_id)
        state = known[1] if known else None
        self.lifecycle.audit("experiment.cancel", experiment_id, actor="hub", reason=message.reason,
                             state=state, dropped=dropped, stopping=[a.case_id for a in stopping])
        log.warning("experiment %s cancelled by the hub (%s): %d queued cases dropped, "
                    "%d running stopped", experiment_id, message.reason, len(dropped),
                    len(stopping))
        # Nothing of it waits for the steward any more (its held cases were dropped above).
        self.lifecycle.discard_held(experiment_id,
                                    f"the hub cancelled the experiment: {message.reason}")
        if state is None:  # it has not arrived: tell the hub now, refuse it when it does
            self.lifecycle.settle(experiment_id, states.CANCELLED, ExperimentState.CANCELLED,
                                  reason=message.reason)
        elif state in (states.RECEIVED, states.HELD) and self.lifecycle.settle(
                experiment_id, states.CANCELLED, ExperimentState.CANCELLED,
                reason=message.reason, expect=state):
            pass
        else:  # accepted (perhaps just now): done once its running cases have stopped
            self.lifecycle.maybe_finish(experiment_id)

    def retry(self, message: RetryCasesMessage) -> None:
        experiment_id = message.experiment_id
        if self.journal.experiment(experiment_id) is None:
            queued, refused = [], dict.fromkeys(message.case_ids,
                                                "the experiment is unknown at this spoke")
        elif (cancelled := self.journal.cancellation(experiment_id)) is not None:
            queued, refused = [], dict.fromkeys(message.case_ids,
                                                f"the experiment was cancelled: {cancelled}")
        else:
            queued, refused = self.journal.add_retry(experiment_id, message.case_ids,
                                                     message.attempt)
        self.lifecycle.audit("cases.retry", experiment_id, actor="hub", attempt=message.attempt,
                             queued=queued, refused=refused, reason=message.reason)
        if refused:
            reasons = sorted({f"{why}: {', '.join(c for c, w in refused.items() if w == why)}"
                              for why in refused.values()})
            self.lifecycle.send_later(ExperimentStatusMessage(
                experiment_id=experiment_id, spoke_id=self.config.spoke_id,
                state=ExperimentState.RETRY_REFUSED, case_ids=list(refused),
                reason="; ".join(reasons)[:2000]))

    def resend(self, message: ResendRecordsMessage) -> None:
        """Results the hub never received (lost on the broker) leave again from the
        journal, unchanged; the hub ignores any it already has."""
        marked, orphans = self.journal.resend_from(message.from_sequence)
        for result in orphans:
            self.journal.send_later(self.lifecycle.outgoing(result))
        log.warning("the hub asks for custody records from %d on: %d result(s) sent again",
                    message.from_sequence, marked + len(orphans))
        self.lifecycle.audit("custody.resend", "", actor="hub",
                             from_sequence=message.from_sequence,
                             results=marked + len(orphans), reason=message.reason)
