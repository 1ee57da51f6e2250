"""Aggregation as Celery tasks. The hub enqueues one task per accepted result; the task
recomputes that experiment's aggregate and stores a new snapshot when its inputs changed.

Two modes, one code path: without ``TRIBUTARY_HUB_CELERY_BROKER_URL`` the task runs in the
hub process as soon as it is enqueued (Celery's ``task_always_eager``: no extra service);
with a broker URL the hub only sends it, and separate worker processes run it::

    TRIBUTARY_HUB_CELERY_BROKER_URL=redis://127.0.0.1:6390/0 \\
    TRIBUTARY_HUB_DATABASE_URL=... celery -A tributary.hub.worker worker

(or ``tributary hub worker``). Workers need the hub's database URL, nothing else."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from sqlalchemy.engine import Engine
from sqlmodel import Session

from tributary.hub.db import open_database
from tributary.hub.services.aggregation import refresh
from tributary.hub.settings import HubSettings

log = logging.getLogger(__name__)
TASK_NAME = "tributary.hub.aggregate_experiment"

_lock = threading.Lock()
_settings: HubSettings | None = None
_engine: Engine | None = None


def _make_app(settings: HubSettings) -> Celery:
    """A Celery app for ``settings``: eager without a broker URL, else on the broker. A new
    app per configuration, because Celery caches its connection pool and queues."""
    broker = settings.celery_broker_url
    celery = Celery("tributary.hub", set_as_current=False)
    celery.conf.update(
        broker_url=broker or "memory://localhost/",
        task_always_eager=broker is None,
        task_eager_propagates=False,  # a failed aggregation never fails ingestion
        task_default_queue=settings.aggregation_queue(),
        task_ignore_result=True,
        task_serializer="json", accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # Enqueueing happens while a result is being acknowledged: give up quickly when
        # the broker is away (the next read finds the snapshot stale and recomputes).
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2,
                                   "interval_step": 0.5, "interval_max": 1.0},
    )
    celery.task(name=TASK_NAME, bind=True, max_retries=5, default_retry_delay=1)(
        aggregate_experiment)
    return celery


def configure(settings: HubSettings, engine: Engine | None = None) -> None:
    """Point aggregation at ``settings``: eager in-process tasks on ``engine`` without a
    broker URL, else messages on the broker (workers open their own engine)."""
    global app, _settings, _engine
    previous, app = app, _make_app(settings)
    previous.close()
    with _lock:
        _settings, _engine = settings, engine


def _current() -> tuple[HubSettings, Engine]:
    global _settings, _engine
    with _lock:
        if _settings is None:
            _settings = HubSettings()
        if _engine is None:
            _engine = open_database(_settings)
        return _settings, _engine


@worker_process_init.connect
def _fresh_engine_after_fork(**_: Any) -> None:
    """A pooled connection must not cross a fork: each worker child opens its own."""
    global _engine
    with _lock:
        _engine = None


def aggregate_experiment(self: Any, experiment_id: str) -> int | None:
    """Recompute ``experiment_id``'s aggregate; the snapshot version now current."""
    settings, engine = _current()
    try:
        with Session(engine) as session:
            snapshot = refresh(session, experiment_id, settings.min_cell_size)
    except Exception as exc:
        log.exception("aggregation of %s failed", experiment_id)
        raise self.retry(exc=exc) from exc
    return None if snapshot is None else snapshot.version


def enqueue(experiment_id: str) -> None:
    """Ask for a re-aggregation of ``experiment_id``. Never raises: the result that caused
    it is already stored, and a missing snapshot is recomputed on the next read. In eager
    mode nothing runs until the hub has configured its engine (a bare ``ingest`` in a script
    or test must not open a default database)."""
    with _lock:
        if app.conf.task_always_eager and _engine is None:
            log.debug("aggregation not configured in this process; %s not re-aggregated",
                      experiment_id)
            return
    try:
        app.tasks[TASK_NAME].apply_async((experiment_id,))
    except Exception:
        log.exception("could not enqueue the aggregation of %s", experiment_id)


app = _make_app(HubSettings())  # `celery -A tributary.hub.worker worker` uses this one
