"""Federated counts: a coordinator asks how many cases match a selection; each target spoke
answers from its own data with small-cell suppression. The hub only ever holds numbers
(or "fewer than k"), and its total is an exact sum or, when any cell is suppressed or a
spoke has not answered, an "at least" lower bound."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlmodel import Session, select

from tributary.hub.models import (
    CountAnswer,
    CountAnswerState,
    CountQuery,
    InboundMessage,
    Spoke,
    utcnow,
)
from tributary.hub.schemas import CountRead, CountSpokeRead
from tributary.hub.services import audit
from tributary.protocol.broker import StompClient, publish_with_retry
from tributary.protocol.destinations import spoke_queue
from tributary.protocol.messages import CohortSelection, CountReply, CountRequest, ProtocolError
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal


class UnknownCount(ProtocolError):
    """A count reply the hub did not ask for (unknown query or spoke)."""


def create_query(session: Session, selection: CohortSelection, spoke_ids: list[str],
                 actor: str, expires_in: timedelta) -> CountQuery:
    query = CountQuery(id=f"cnt-{uuid.uuid4().hex[:12]}",
                       selection=selection.model_dump(mode="json"), created_by=actor,
                       expires_at=utcnow() + expires_in)
    session.add(query)
    session.flush()
    for spoke_id in dict.fromkeys(spoke_ids):
        session.add(CountAnswer(query_id=query.id, spoke_id=spoke_id))
    audit.record(session, actor, "count.requested", query.id, selection=query.selection,
                 spokes=list(dict.fromkeys(spoke_ids)))
    session.commit()
    return query


def publish_query(session: Session, client: StompClient, key: SigningKey,
                  query: CountQuery) -> None:
    """Send one signed, expiring request per spoke not yet asked; repeatable after an
    outage (raises PublishError, and a retry sends only what is missing)."""
    answers = session.exec(select(CountAnswer).where(CountAnswer.query_id == query.id)).all()
    for answer in answers:
        if answer.state != CountAnswerState.PENDING:
            continue
        message = CountRequest(query_id=query.id, spoke_id=answer.spoke_id,
                               selection=CohortSelection.model_validate(query.selection),
                               expires_at=query.expires_at, requested_by=query.created_by)
        headers = {"tributary-kind": message.kind}
        if query.expires_at is not None:
            headers["expires"] = str(int(query.expires_at.timestamp() * 1000))
        publish_with_retry(client, spoke_queue(answer.spoke_id, client.settings.federation),
                           seal(message, key), headers)
        answer.state = CountAnswerState.PUBLISHED
        answer.request_message_id = message.message_id
        session.add(answer)
        audit.record(session, "hub", "message.sent", query.id, kind=message.kind,
                     spoke=answer.spoke_id, message_id=message.message_id)
        session.commit()


def ingest_count_reply(session: Session, message: CountReply, commit: bool = True) -> bool:
    """Store a spoke's (already signature-verified) answer; False for a duplicate. Refused
    (:class:`UnknownCount`) before anything changes; ``commit=False`` leaves the commit to
    the caller (the results consumer's batch)."""
    spoke = session.get(Spoke, message.spoke_id)
    if spoke is None:
        raise UnknownCount(f"message from unregistered spoke {message.spoke_id!r}")
    answer = session.get(CountAnswer, (message.query_id, message.spoke_id))
    if answer is None:
        raise UnknownCount(f"count {message.query_id!r} did not ask spoke {message.spoke_id!r}")
    spoke.last_seen_at = utcnow()
    session.add(spoke)
    session.add(InboundMessage(message_id=message.message_id, kind=message.kind,
                               spoke_id=message.spoke_id))
    duplicate = answer.state in (CountAnswerState.ANSWERED, CountAnswerState.REFUSED)
    if not duplicate:
        answer.state = (CountAnswerState.REFUSED if message.refused
                        else CountAnswerState.ANSWERED)
        answer.count, answer.fewer_than = message.count, message.fewer_than
        answer.reason = message.refused
        answer.reply_message_id = message.message_id
        answer.answered_at = utcnow()
        session.add(answer)
    audit.record(session, message.spoke_id, "message.received", message.query_id,
                 kind=message.kind, message_id=message.message_id, duplicate=duplicate,
                 count=message.count, fewer_than=message.fewer_than, refused=message.refused)
    if commit:
        session.commit()
    return not duplicate


def count_read(session: Session, query: CountQuery) -> CountRead:
    answers = session.exec(select(CountAnswer).where(CountAnswer.query_id == query.id)
                           .order_by(CountAnswer.spoke_id)).all()  # type: ignore[arg-type]
    total = sum(a.count or 0 for a in answers)
    complete = all(a.state in (CountAnswerState.ANSWERED, CountAnswerState.REFUSED)
                   for a in answers)
    numeric = all(a.state == CountAnswerState.ANSWERED for a in answers)
    suppressed = [a for a in answers if a.fewer_than is not None]
    exact = numeric and not suppressed
    at_most = total + sum(a.fewer_than - 1 for a in suppressed  # type: ignore[operator]
                          ) if numeric else None
    return CountRead(
        id=query.id, selection=query.selection, created_by=query.created_by,
        created_at=query.created_at, expires_at=query.expires_at,
        spokes=[CountSpokeRead(spoke_id=a.spoke_id, state=a.state.value, count=a.count,
                               fewer_than=a.fewer_than, reason=a.reason,
                               answered_at=a.answered_at) for a in answers],
        complete=complete, total=total, total_is_exact=exact, total_at_most=at_most,
        total_text=str(total) if exact else f"at least {total}",
    )


def count_reads(session: Session, limit: int | None = None) -> list[CountRead]:
    """The federated counts asked, newest first (the ``limit`` newest)."""
    query = select(CountQuery).order_by(CountQuery.created_at.desc())  # type: ignore[attr-defined]
    return [count_read(session, q) for q in session.exec(query.limit(limit))]


def cohort_sizes(session: Session) -> dict[str, CountAnswer]:
    """Each spoke's latest answer to a federated count of all its cases (an empty
    selection): the spoke's own figure, small cells already suppressed by the spoke."""
    latest_answers: dict[str, CountAnswer] = {}
    rows = session.exec(select(CountQuery, CountAnswer)
                        .where(CountAnswer.query_id == CountQuery.id)
                        .where(CountAnswer.state == CountAnswerState.ANSWERED)
                        .order_by(CountQuery.created_at)).all()  # type: ignore[arg-type]
    for query, answer in rows:
        if not any(value for value in query.selection.values()
                   if value not in (None, [], {}, "CT")):
            latest_answers[answer.spoke_id] = answer
    return latest_answers
