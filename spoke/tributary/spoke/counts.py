"""Federated counts at the spoke: how many local cases match a selection, answered with
small-cell suppression. Only a number (or "fewer than k") leaves; never a case, a
pseudonym or an attribute. A count below ``[counts] min_cell`` is reported as
"fewer than min_cell" so that a rare combination of criteria cannot single out a patient.
A count selects no case ids and caps nothing, and an answer within k of an earlier one for
the same requester is refused (:mod:`tributary.spoke.count_guard`).
Counts come from the spoke's catalog, like experiments' cohorts, so a count is exactly the
size of the cohort an experiment with the same selection would get."""

from __future__ import annotations

import logging
import sqlite3
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from tributary.protocol.count_policy import count_selection_problem
from tributary.protocol.messages import CohortSelection, CountReply, CountRequest
from tributary.spoke.catalog import SelectionRefused
from tributary.spoke.config import SpokeConfig
from tributary.spoke.count_guard import CountHistory, check
from tributary.spoke.ingest import Audit, open_catalog, refresh_catalog

if TYPE_CHECKING:
    from tributary.spoke.lifecycle import Lifecycle

log = logging.getLogger(__name__)


def matching_cases(config: SpokeConfig, selection: CohortSelection, audit: Audit,
                   target: str) -> int:
    """How many of the site's catalogued cases ``selection`` picks (after the incremental
    ingest the site's ``[catalog]`` settings ask for). The one place counts and the
    steward's view of a cohort's size match criteria against local data. Raises
    :class:`SelectionRefused` for criteria the release policy forbids."""
    with open_catalog(config) as catalog:
        refresh_catalog(config, catalog, audit, target)
        return catalog.count(selection)


def suppress(query_id: str, spoke_id: str, count: int, min_cell: int) -> CountReply:
    """The reply for a true ``count`` under the site's small-cell threshold."""
    if count < min_cell:
        return CountReply(query_id=query_id, spoke_id=spoke_id, fewer_than=min_cell)
    return CountReply(query_id=query_id, spoke_id=spoke_id, count=count)


def answer(config: SpokeConfig, request: CountRequest,
           audit: Audit) -> tuple[CountReply, int | None]:
    """The reply to send and the true count (which stays in the spoke's own audit log)."""
    def refuse(reason: str) -> tuple[CountReply, None]:
        return CountReply(query_id=request.query_id, spoke_id=config.spoke_id,
                          refused=reason), None

    if not config.counts.enabled:
        return refuse("this site does not answer count requests")
    if request.expires_at is not None and request.expires_at < datetime.now(UTC):
        return refuse("count request expired")
    requester = request.requested_by
    if requester is None:
        return refuse("the request names no requester; counts are answered per requester")
    policy = config.counts
    with CountHistory(config.work_dir / "count_history.db") as history:
        problem = count_selection_problem(request.selection)
        if problem is None:
            try:
                count = matching_cases(config, request.selection, audit, request.query_id)
            except SelectionRefused as exc:
                problem = str(exc)
            except (OSError, ValueError, sqlite3.Error) as exc:
                log.exception("count %s failed", request.query_id)
                return refuse(f"the site could not read its cases: {type(exc).__name__}")
        if problem is None:
            problem = check(history, requester, count, policy.min_cell, policy.query_budget,
                            policy.budget_days).refused
        history.record(requester, request.query_id, None if problem else count)
    if problem is not None:
        return refuse(problem)
    return suppress(request.query_id, config.spoke_id, count, policy.min_cell), count


class CountResponder:
    """The spoke's side of count requests: journal them as they arrive, answer them on the
    counter thread. ``stopping`` ends a round of answers early (the rest wait for the next
    start, journaled)."""

    def __init__(self, config: SpokeConfig, lifecycle: Lifecycle,
                 stopping: threading.Event) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.stopping = stopping

    def take(self, request: CountRequest) -> None:
        """Journal the request (the caller acknowledges it once this returns); the counter
        thread answers it (:meth:`answer_waiting`). A redelivery of a request journaled or
        answered before is dropped."""
        if not self.lifecycle.journal.add_count_request(request):
            self.lifecycle.audit("message.dropped", request.query_id, actor="hub",
                                 message_id=request.message_id,
                                 reason="replay: already received")

    def answer_waiting(self) -> int:
        """Answer the journaled count requests, oldest first: audit each answer, then put
        the signed reply in the durable outbox and retire the request in one transaction.
        Returns how many were answered."""
        lifecycle = self.lifecycle
        answered = 0
        for request in lifecycle.journal.count_requests():
            if self.stopping.is_set():
                break
            reply, true_count = answer(self.config, request, lifecycle.audit)
            lifecycle.audit(
                "count.answered", request.query_id, actor="hub",
                selection=request.selection.model_dump(mode="json"),
                requested_by=request.requested_by, true_count=true_count,
                reported_count=reply.count, fewer_than=reply.fewer_than,
                refused=reply.refused, reply_message_id=reply.message_id)
            lifecycle.journal.answer_count(request, lifecycle.outgoing(reply))
            lifecycle.wake_outbox()
            log.info("count %s answered: %s", request.query_id,
                     reply.count if reply.count is not None else
                     f"fewer than {reply.fewer_than}" if reply.fewer_than
                     else f"refused ({reply.refused})")
            answered += 1
        return answered
