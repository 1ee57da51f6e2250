"""The aggregation worker, one of the hub's three entry points (beside the web app,
:mod:`tributary.hub.main`, and the results consumer, :mod:`tributary.hub.consumer`). It
defines the bodies of the tasks that :mod:`tributary.hub.tasks` enqueues: the debouncer
(:mod:`tributary.hub.services.debounce`) enqueues one per stale study at most once per
interval, and completion one at once; it recomputes that experiment's aggregate and stores a
new snapshot when its inputs changed. The training round loop enqueues the close of each
round (:mod:`tributary.hub.services.training_close`: unmask the sum, apply the server
optimiser, store the next global model) when a Celery broker is set.

Two modes, one code path: without ``TRIBUTARY_HUB_CELERY_BROKER_URL`` the task runs in the
process that accepted the result (the hub calls :func:`configure` with its engine); with a
broker URL that process only sends it, and separate worker processes run it::

    TRIBUTARY_HUB_CELERY_BROKER_URL=redis://127.0.0.1:6390/0 \\
    TRIBUTARY_HUB_DATABASE_URL=... celery -A tributary.hub.worker worker

(or ``tributary hub worker``). Workers need the hub's database URL, and for training the
hub's object-store credentials (``TRIBUTARY_HUB_OBJECTSTORE_CREDENTIALS``)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from sqlalchemy.engine import Engine
from sqlmodel import Session

from tributary.hub import tasks
from tributary.hub.db import open_database
from tributary.hub.services import training, training_close, training_optimiser
from tributary.hub.services.debounce import recompute
from tributary.hub.settings import HubSettings
from tributary.protocol.messages import ProtocolError
from tributary.protocol.objects import ObjectStore
from tributary.protocol.training.secagg import SecAggError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_settings: HubSettings | None = None
_engine: Engine | None = None
_object_store: ObjectStore | None = None


def aggregate_experiment(self: Any, experiment_id: str) -> int | None:
    """Recompute ``experiment_id``'s aggregate; the snapshot version now current."""
    settings, engine = _current()
    try:
        with Session(engine) as session:
            snapshot = recompute(session, experiment_id, settings.min_cell_size,
                                 settings.aggregate_full_interval_seconds)
    except Exception as exc:
        log.exception("aggregation of %s failed", experiment_id)
        raise self.retry(exc=exc) from exc
    return None if snapshot is None else snapshot.version


def aggregate_training_round(self: Any, round_id: str) -> str | None:
    """Close training round ``round_id`` (:func:`training_close.close_round`); the digest
    of the next global model, or None if the round was not ready or was retried."""
    settings, engine = _current()
    try:
        with Session(engine) as session:
            new = training_close.close_round(session, _store(settings), round_id)
    except (training.TrainingError, SecAggError, ProtocolError,
            training_optimiser.OptimiserStateError) as exc:
        # The round's own fault (a tampered model, a sum that cannot be unmasked): the
        # round loop decides what happens to it, retrying the task would not help.
        log.warning("training round %s not aggregated: %s", round_id, exc)
        return None
    except Exception as exc:
        log.exception("aggregation of training round %s failed", round_id)
        raise self.retry(exc=exc) from exc
    return None if new is None else new[0].digest


def _store(settings: HubSettings) -> ObjectStore:
    global _object_store
    with _lock:
        if _object_store is None:
            if settings.objectstore_credentials is None:
                raise RuntimeError("set TRIBUTARY_HUB_OBJECTSTORE_CREDENTIALS: closing a "
                                   "training round needs the hub's object store")
            _object_store = ObjectStore.from_file(settings.objectstore_credentials)
        return _object_store


def define_tasks(celery: Celery) -> Celery:
    """Give ``celery`` the bodies of the hub's tasks (not shared: Celery would otherwise add
    them to every app made later, including one that must drop its tasks)."""
    celery.task(name=tasks.AGGREGATE_EXPERIMENT, bind=True, shared=False, max_retries=5,
                default_retry_delay=1)(aggregate_experiment)
    celery.task(name=tasks.AGGREGATE_TRAINING_ROUND, bind=True, shared=False, max_retries=5,
                default_retry_delay=2)(aggregate_training_round)
    return celery


def configure(settings: HubSettings, engine: Engine | None = None) -> None:
    """Point the hub's tasks at ``settings``. Without a Celery broker they run in this
    process on ``engine``, and are dropped while there is none (a lost task is made up on
    the next read); with a broker they are only sent, and workers open their own engine."""
    global app, _settings, _engine, _object_store
    celery = tasks.configure(settings)
    if engine is not None or not tasks.in_process():
        define_tasks(celery)
    with _lock:
        app, _settings, _engine, _object_store = celery, settings, engine, None


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


#: The app `celery -A tributary.hub.worker worker` (and ``tributary hub worker``) runs:
#: configured from the environment, with the task bodies only when a broker is set (an
#: in-process hub defines them with its engine, through :func:`configure`).
app: Celery = tasks.app if tasks.in_process() else define_tasks(tasks.app)
