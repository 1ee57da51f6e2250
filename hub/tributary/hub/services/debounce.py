"""Aggregation decoupled from ingestion. An accepted result only marks its experiment's
aggregate stale (one conditional UPDATE, constant time); a debouncer in each hub process
recomputes a stale study's snapshot at most once per ``aggregate_interval_seconds``: in its
own thread when Celery runs eagerly (single-process hub), else by sending one Celery task.
A study is claimed in the database (a conditional UPDATE on ``aggregate_claimed_at``) before
it is recomputed or enqueued, so several hub processes never work on the same study at
once, and a study is recomputed at most once per interval whatever the result rate.

Recomputed in-process, a large study's snapshot takes seconds (bootstrap intervals over
30,000 results), and it shares the process, and Python's interpreter lock, with the
results consumer; so passes are paced to take at most a tenth of a core (their CPU time)
over the last minute (after a lone long pass, the next waits nine times as long), whatever the
study's size, and ingestion keeps its rate (the snapshot is then refreshed less often; the
page says when it was computed). Enqueueing to Celery workers takes no time, so there it
changes nothing."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from datetime import timedelta

from sqlalchemy import func, or_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from tributary.hub import tasks
from tributary.hub.models import AggregateSnapshot, Experiment, utcnow
from tributary.hub.services.aggregation import full_behind, refresh
from tributary.hub.settings import HubSettings

log = logging.getLogger(__name__)

#: The most of the process's time the debouncer's passes take (see the module docstring).
BUSY_SHARE = 0.1

#: ... over the passes of this many seconds.
BUSY_WINDOW = 60.0

#: The debouncers running in this process.
_running: set[Debouncer] = set()
_running_lock = threading.Lock()


def recomputes_here(within: float) -> bool:
    """Whether a debouncer of this process recomputes stale studies itself (Celery eager)
    at least every ``within`` seconds when idle: then a read that finds a lagging snapshot
    leaves it to that debouncer, whose passes are bounded to a share of the process."""
    with _running_lock:
        return tasks.in_process() and any(d.interval <= within and d.alive()
                                          for d in _running)


def mark_stale(session: Session, experiment_id: str) -> None:
    """Note, in the caller's transaction, that ``experiment_id``'s aggregate lags behind
    its results (keeps the earliest time: the snapshot is stale since then)."""
    session.execute(
        update(Experiment).where(col(Experiment.id) == experiment_id)
        .values(aggregate_stale_since=func.coalesce(col(Experiment.aggregate_stale_since),
                                                    utcnow()))
        .execution_options(synchronize_session=False))


def claim_due(session: Session, interval: float) -> list[str]:
    """Claim the stale studies nobody claimed in the last ``interval`` seconds; each claim is
    a conditional UPDATE, so of two processes only one gets a given study."""
    now = utcnow()
    due = or_(col(Experiment.aggregate_claimed_at).is_(None),
              col(Experiment.aggregate_claimed_at) <= now - timedelta(seconds=interval))
    stale = col(Experiment.aggregate_stale_since).is_not(None)
    candidates = session.exec(select(Experiment.id).where(stale, due)).all()
    claimed = []
    for experiment_id in candidates:
        outcome = session.execute(
            update(Experiment).where(col(Experiment.id) == experiment_id, stale, due)
            .values(aggregate_claimed_at=now).execution_options(synchronize_session=False))
        session.commit()
        if outcome.rowcount == 1:  # type: ignore[attr-defined]
            claimed.append(experiment_id)
    return claimed


def recompute(session: Session, experiment_id: str, min_cell_size: int,
              full_interval: float | None = None) -> AggregateSnapshot | None:
    """Clear the stale mark, then store a new snapshot from the results now committed: a
    result committed after the clear marks the study stale again, so none is missed. A
    snapshot whose figures that need every value lag behind (``full_interval``, see
    :func:`refresh`) leaves the study marked stale, so a later pass brings them up to date
    even if no other result arrives."""
    session.execute(update(Experiment).where(col(Experiment.id) == experiment_id)
                    .values(aggregate_stale_since=None)
                    .execution_options(synchronize_session=False))
    session.commit()
    try:
        snapshot = refresh(session, experiment_id, min_cell_size, full_interval)
    except Exception:
        session.rollback()
        mark_stale(session, experiment_id)
        session.commit()
        raise
    experiment = session.get(Experiment, experiment_id)
    if snapshot is not None and experiment is not None and full_interval is not None \
            and full_behind(session, experiment, snapshot.inputs_sha256):
        mark_stale(session, experiment_id)
        session.commit()
    return snapshot


class Debouncer:
    """The hub process's periodic pass over stale studies (see the module docstring)."""

    def __init__(self, settings: HubSettings, engine: Engine) -> None:
        self.settings, self.engine = settings, engine
        self.interval = settings.aggregate_interval_seconds
        self.full_interval = settings.aggregate_full_interval_seconds
        #: CPU seconds this process's passes took (the debouncer's thread; for benches).
        self.cpu_seconds = 0.0
        #: Recomputations this process made or enqueued (for benches).
        self.recomputed = 0
        self._passes: deque[tuple[float, float]] = deque()  # (began, took), BUSY_WINDOW
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aggregate-debouncer",
                                        daemon=True)

    def start(self) -> Debouncer:
        self._thread.start()
        with _running_lock:
            _running.add(self)
        return self

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        with _running_lock:
            _running.discard(self)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def run_once(self) -> list[str]:
        """Claim the due studies and recompute (eager) or enqueue (Celery) each."""
        with Session(self.engine) as session:
            claimed = claim_due(session, self.interval)
        for experiment_id in claimed:
            if self._stop.is_set():
                break
            if tasks.in_process():
                with Session(self.engine) as session:
                    recompute(session, experiment_id, self.settings.min_cell_size,
                              self.full_interval)
            else:
                tasks.aggregate_experiment(experiment_id)
            self.recomputed += 1
        return claimed

    def next_wait(self, took: float, now: float | None = None) -> float:
        """Seconds until the next pass, after one that took ``took`` seconds of CPU and ended
        ``now`` (monotonic): the interval, or longer so that the passes of the last
        ``BUSY_WINDOW`` seconds take at most ``BUSY_SHARE`` of the time since the first
        of them began. A lone long pass (a full pass over a large study) is followed by a
        wait of nine times its length; short passes (from running sums) between two full
        passes go at the interval."""
        now = time.monotonic() if now is None else now
        self._passes.append((now - took, took))
        while self._passes[0][0] < now - BUSY_WINDOW:
            self._passes.popleft()
        busy = sum(length for _, length in self._passes)
        return max(self.interval, busy / BUSY_SHARE - (now - self._passes[0][0]))

    def _loop(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            cpu = time.thread_time()
            try:
                self.run_once()
            except Exception:
                log.exception("aggregate debouncer pass failed; retrying next interval")
            took = time.thread_time() - cpu  # CPU, not wall: waiting for the lock costs none
            self.cpu_seconds += took
            wait = self.next_wait(took)


def start(settings: HubSettings, engine: Engine) -> Debouncer:
    """Start this process's debouncer (stop it before disposing of ``engine``)."""
    return Debouncer(settings, engine).start()
