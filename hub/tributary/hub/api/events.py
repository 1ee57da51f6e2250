"""Live progress as server-sent events (SSE): the dashboard's pages and ``tributary study
watch`` follow experiments without polling the REST API themselves.

The cost scales with studies, not with viewers nor cases: one :class:`Feed` per study (and
one for the list) polls the database's aggregate counts once every ``POLL_SECONDS`` for all
of its viewers and fans the changes out. A stream of one experiment sends a first
``progress`` event with the experiment, its per-spoke counts, the first page of cases (for a
user who may see per-case data, else ``[]``) and the aggregate ``snapshot`` version; then
``progress`` events with ``"delta": true`` holding only what changed: the experiment's state
and the targets whose counts or state changed, and the snapshot version (a client re-reads
its results when it changes). A comment line is sent as keep-alive, and an ``end`` event
once the experiment is over, after which clients close. The same bearer token or dashboard
cookie as the rest of the API authorises it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool

from tributary.hub.deps import current_user, get_session, may_see_cases
from tributary.hub.models import (
    TERMINAL_TARGET_STATES,
    AggregateSnapshot,
    Experiment,
    ExperimentState,
    TargetState,
    User,
)
from tributary.hub.services.progress import case_page, experiment_read, experiment_reads

router = APIRouter(prefix="/api/experiments", tags=["experiments"],
                   dependencies=[Depends(current_user)])

POLL_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0
#: States in which an experiment may still change; any other state ends the stream.
LIVE_STATES = {ExperimentState.DRAFT.value, ExperimentState.LAUNCHED.value}
SETTLED_TARGET_STATES = {s.value for s in TERMINAL_TARGET_STATES} | {TargetState.PENDING.value}


def snapshot_version(session: Session, experiment_id: str) -> int:
    """The latest aggregate snapshot's version (0 before the first)."""
    return session.exec(select(func.max(AggregateSnapshot.version)).where(
        AggregateSnapshot.experiment_id == experiment_id)).one() or 0


def experiment_state(engine: Engine, experiment_id: str,
                     online_seconds: float) -> dict[str, Any] | None:
    """The experiment with its per-spoke counts (aggregate queries only, never a case row)
    and its snapshot version; None if unknown."""
    with Session(engine) as session:
        experiment = session.get(Experiment, experiment_id)
        if experiment is None:
            return None
        read = experiment_read(session, experiment, online_seconds)
        return {"experiment": read.model_dump(mode="json"),
                "snapshot": snapshot_version(session, experiment_id)}


def first_cases(engine: Engine, experiment_id: str) -> list[dict[str, Any]]:
    """The first page of cases, for a viewer's first event."""
    with Session(engine) as session:
        return [c.model_dump(mode="json") for c in case_page(session, experiment_id).cases]


def experiments_state(engine: Engine, online_seconds: float) -> dict[str, Any]:
    """Every experiment with its per-spoke progress (no cases), newest first."""
    with Session(engine) as session:
        return {"experiments": [e.model_dump(mode="json")
                                for e in experiment_reads(session, online_seconds)]}


def delta(old: dict[str, Any], new: dict[str, Any] | None) -> dict[str, Any] | None:
    """What changed from one experiment state to the next (None if nothing): the targets
    whose fields changed, the experiment's other fields whole (they are small)."""
    if new is None or old == new:
        return None
    before = {t["spoke_id"]: t for t in old["experiment"]["targets"]}
    experiment = {k: v for k, v in new["experiment"].items() if k != "targets"}
    experiment["targets"] = [t for t in new["experiment"]["targets"]
                             if before.get(t["spoke_id"]) != t]
    return {"experiment": experiment, "snapshot": new["snapshot"], "delta": True}


def is_over(state: dict[str, Any] | None) -> bool:
    """Nothing more will change: the experiment is past launched and every spoke has
    settled (a cancelled experiment's spokes still confirm their cancellation)."""
    if state is None:  # deleted while watched
        return True
    experiment = state["experiment"]
    return experiment["state"] not in LIVE_STATES and all(
        t["state"] in SETTLED_TARGET_STATES for t in experiment["targets"])


class Feed:
    """One computation shared by every viewer of a study (or of the list): polls
    ``compute`` while anyone listens and puts each new state in every viewer's queue."""

    def __init__(self, key: str, compute: Callable[[], Any],
                 feeds: dict[str, Feed]) -> None:
        self.key, self.compute, self.feeds = key, compute, feeds
        self.current: Any = None
        self.viewers: set[asyncio.Queue[Any]] = set()
        self.task: asyncio.Task[None] | None = None
        self.polls = 0  # how many times the database was read (for tests and benches)

    async def subscribe(self) -> tuple[asyncio.Queue[Any], Any]:
        """A queue of the states to come, and the current state."""
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=8)
        # Read afresh for each new viewer (once per connection, not per second): a viewer
        # reloading right after a change (a retry) must not be told the study is over.
        await self._read()
        self.viewers.add(queue)
        if self.task is None:
            self.task = asyncio.create_task(self._run())
        return queue, self.current

    async def _read(self) -> Any:
        self.current = await run_in_threadpool(self.compute)
        self.polls += 1
        return self.current

    def unsubscribe(self, queue: asyncio.Queue[Any]) -> None:
        self.viewers.discard(queue)

    async def _run(self) -> None:
        try:
            while self.viewers:
                await asyncio.sleep(POLL_SECONDS)
                if not self.viewers:
                    break
                before = self.current
                state = await self._read()
                if state == before:
                    continue
                for queue in list(self.viewers):
                    if queue.full():  # a viewer that does not read keeps only the newest
                        with contextlib.suppress(asyncio.QueueEmpty):
                            queue.get_nowait()
                    queue.put_nowait(state)
        finally:
            self.task = None
            if not self.viewers and self.feeds.get(self.key) is self:
                del self.feeds[self.key]


def _feed(request: Request, key: str, compute: Callable[[], Any]) -> Feed:
    feeds: dict[str, Feed] | None = getattr(request.app.state, "event_feeds", None)
    if feeds is None:
        feeds = request.app.state.event_feeds = {}
    feed = feeds.get(key)
    if feed is None:
        feed = feeds[key] = Feed(key, compute, feeds)
    return feed


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream(request: Request, feed: Feed,
                  first: Callable[[Any], Any], change: Callable[[Any, Any], Any],
                  done: Callable[[Any], bool]) -> AsyncIterator[str]:
    """One viewer: the first event whole, then the changes, until over or disconnected."""
    yield "retry: 3000\n\n"
    queue, last = await feed.subscribe()
    try:
        yield _event("progress", await first(last))
        if done(last):
            yield _event("end", {})
            return
        quiet = 0.0
        while not await request.is_disconnected():
            try:
                state = await asyncio.wait_for(queue.get(), POLL_SECONDS)
            except TimeoutError:
                quiet += POLL_SECONDS
                if quiet >= KEEPALIVE_SECONDS:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                continue
            quiet = 0.0
            data = change(last, state)
            last = state
            if data is not None:
                yield _event("progress", data)
            if done(state):
                yield _event("end", {})
                return
    finally:
        feed.unsubscribe(queue)


def release(session: Session) -> None:
    """Give the request's database connection back before streaming: the request's session
    (which authenticated the viewer) lives as long as the response, and a hundred viewers
    holding a pooled connection each would starve every other request."""
    session.close()


def _response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.get("/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def experiments_events(request: Request,
                       session: Session = Depends(get_session)) -> StreamingResponse:
    """SSE stream of every experiment's progress (``progress`` events with
    ``{"experiments": [...]}``, as ``GET /api/experiments`` returns them), sent when
    anything changes; one computation per hub for all its viewers."""
    release(session)
    engine, window = request.app.state.engine, request.app.state.settings.spoke_online_seconds
    feed = _feed(request, "*", lambda: experiments_state(engine, window))

    async def first(state: Any) -> Any:
        return state

    return _response(_stream(request, feed, first, lambda _old, new: new, lambda _: False))


@router.get("/{experiment_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def experiment_events(experiment_id: str, request: Request,
                      user: User = Depends(current_user),
                      session: Session = Depends(get_session)) -> StreamingResponse:
    """SSE stream of one experiment: a first ``progress`` event ``{"experiment": ...,
    "cases": [...], "snapshot": N}`` (as ``GET /api/experiments/{id}`` and the first page
    of ``.../cases``; ``cases`` is empty for a user who may not see per-case data), then
    ``progress`` events ``{"experiment": {..., "targets": [changed targets]}, "snapshot":
    N, "delta": true}`` whenever something changes, then ``end`` once it is over
    (completed or cancelled, and every spoke settled)."""
    engine, window = request.app.state.engine, request.app.state.settings.spoke_online_seconds
    found = session.get(Experiment, experiment_id)
    if found is None:
        raise HTTPException(404, f"no experiment {experiment_id!r}")
    with_cases = may_see_cases(user, found)
    release(session)
    feed = _feed(request, f"experiment:{experiment_id}",
                 lambda: experiment_state(engine, experiment_id, window))

    async def first(state: Any) -> Any:
        cases = (await run_in_threadpool(first_cases, engine, experiment_id)
                 if with_cases else [])
        return {**state, "cases": cases}

    return _response(_stream(request, feed, first, delta, is_over))
