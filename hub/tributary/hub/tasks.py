"""The hub's Celery app and how services enqueue its tasks. This module imports no service:
services enqueue through it, and the task bodies (which call services) are defined by the
worker entry point, :mod:`tributary.hub.worker`, so neither imports the other back.

Without ``TRIBUTARY_HUB_CELERY_BROKER_URL`` a task runs in the enqueueing process as soon
as it is enqueued (Celery's ``task_always_eager``), provided that process defined its body
(the hub does, through ``worker.configure``); with a broker URL the task is only sent, by
name, and separate worker processes run it."""

from __future__ import annotations

import logging
import threading

from celery import Celery

from tributary.hub.settings import HubSettings

log = logging.getLogger(__name__)

#: Recompute one experiment's aggregate (body: ``tributary.hub.worker``).
AGGREGATE_EXPERIMENT = "tributary.hub.aggregate_experiment"
#: Close one training round: unmask, step, store the next model (body: the worker).
AGGREGATE_TRAINING_ROUND = "tributary.hub.aggregate_training_round"

_lock = threading.Lock()


def make_app(settings: HubSettings) -> Celery:
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
    return celery


app = make_app(HubSettings())


def configure(settings: HubSettings) -> Celery:
    """Replace the app by one for ``settings`` and return it; it has no task bodies yet."""
    global app
    with _lock:
        previous, app = app, make_app(settings)
    previous.close()
    return app


def in_process() -> bool:
    """Whether tasks run where they are enqueued (no Celery broker configured)."""
    return bool(app.conf.task_always_eager)


def enqueue(name: str, *args: object) -> None:
    """Run task ``name`` in-process or send it to the workers. Never raises: what caused it
    is already stored, and a lost task is made up for later (an aggregate found stale on
    read is recomputed). In-process, a task whose body this process never defined is
    dropped: a bare ``ingest`` in a script or test must not open a default database."""
    current = app
    try:
        if current.conf.task_always_eager:
            task = current.tasks.get(name)
            if task is None:
                log.debug("%s%r not run: no body for it in this process", name, args)
                return
            task.apply_async(args)
        else:
            current.send_task(name, args)
    except Exception:
        log.exception("could not enqueue %s%r", name, args)


def aggregate_experiment(experiment_id: str) -> None:
    """Ask for a re-aggregation of ``experiment_id`` (see :func:`enqueue`)."""
    enqueue(AGGREGATE_EXPERIMENT, experiment_id)


def aggregate_training_round(round_id: str) -> None:
    """Ask the workers to close training round ``round_id`` (see :func:`enqueue`; the round
    loop calls the body itself when there is no broker)."""
    enqueue(AGGREGATE_TRAINING_ROUND, round_id)


_background: set[str] = set()


def aggregate_in_background(experiment_id: str) -> None:
    """Ask for a re-aggregation without waiting for it, from a web request that found the
    snapshot lagging: with a broker the task is only sent; in-process it runs in a thread
    of its own (one per experiment at a time). Running it in the request, as before, made
    the page that found it wait for a full recomputation: seconds at 30,000 cases."""
    if not in_process():
        aggregate_experiment(experiment_id)
        return
    with _lock:
        if experiment_id in _background:
            return
        _background.add(experiment_id)

    def work() -> None:
        try:
            aggregate_experiment(experiment_id)
        finally:
            with _lock:
                _background.discard(experiment_id)

    threading.Thread(target=work, name=f"aggregate-{experiment_id}", daemon=True).start()
