"""The web app, one of the hub's three entry points (beside the results consumer,
:mod:`tributary.hub.consumer`, and the aggregation worker, :mod:`tributary.hub.worker`):
the REST API and the pages, and by default the results consumer in the same process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from tributary.hub import __version__, training_coordinator, vertical_coordinator, worker
from tributary.hub.api import (
    access_requests,
    algorithms,
    audit,
    auth,
    catalog,
    counts,
    deadletters,
    events,
    experiments,
    people,
    psi,
    registry,
    results,
    spokes,
    training,
    training_events,
    training_models,
    vertical,
)
from tributary.hub.consumer import ResultsConsumer
from tributary.hub.db import make_engine, upgrade_schema
from tributary.hub.models import Role, User
from tributary.hub.services import debounce, lapse
from tributary.hub.services.anchors import check_hub_log
from tributary.hub.services.audit import attach_forensic_log
from tributary.hub.services.registry_client import token_signer
from tributary.hub.services.users import create_user
from tributary.hub.settings import HubSettings
from tributary.hub.signin import make_throttle
from tributary.hub.transport import StrictTransportSecurity
from tributary.hub.web import SignInRequired
from tributary.hub.web import router as web_router
from tributary.protocol.auditlog import AuditLog
from tributary.protocol.broker import StompClient
from tributary.protocol.signing import SigningKey

log = logging.getLogger(__name__)
#: The dashboard's stylesheet and script, served by the hub itself (no outside host).
STATIC = Path(__file__).parent / "static"


def _bootstrap_admin(engine: Engine, settings: HubSettings) -> None:
    """The first administrator, from the environment, so a fresh hub can be signed into."""
    if settings.admin_password is None:
        return
    with Session(engine) as session:
        if session.exec(select(User)).first() is None:
            create_user(session, "admin", settings.admin_password.get_secret_value(),
                        [Role.ADMIN.value], actor="bootstrap")


def _check_forensic_log(engine: Engine, forensic: AuditLog) -> None:
    """Record (and log) a forensic log that no longer reaches its anchored head."""
    with Session(engine) as session:
        problem = check_hub_log(session, forensic)
        session.commit()
    if problem is not None:
        log.error("%s", problem)


def create_app(settings: HubSettings | None = None) -> FastAPI:
    settings = settings or HubSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url, migrate=False)
        forensic = attach_forensic_log(engine, settings.audit_log_path())
        upgrade_schema(engine)
        if forensic is not None:
            _check_forensic_log(engine, forensic)
            forensic.append("hub", "hub.started", detail={"version": __version__})
        key = SigningKey.load_or_create(settings.signing_key)
        token_signer(settings)  # a misconfigured registry token service stops the start
        broker = StompClient(settings.broker(), "hub").start()
        app.state.settings, app.state.engine, app.state.broker = settings, engine, broker
        app.state.signing_key = key
        app.state.signin_throttle = make_throttle(settings, engine)  # in the database
        worker.configure(settings, engine)  # aggregation tasks: in-process or on Celery
        _bootstrap_admin(engine, settings)
        if settings.consume_results:
            ResultsConsumer(engine, broker, key, settings).start()
        debouncer = debounce.start(settings, engine)  # stale aggregates, off the consumer
        membership_watch = lapse.start(settings, engine, broker, key)  # None: no authority
        trainer = (training_coordinator.from_settings(settings, engine, broker, key)
                   if settings.run_training else None)
        if trainer is not None:
            trainer.serve(settings.training_poll_seconds)  # resumes every open study
        verticals = (vertical_coordinator.from_settings(settings, engine, broker, key)
                     if settings.run_training else None)
        if verticals is not None:
            verticals.serve(settings.training_poll_seconds)
        yield
        if verticals is not None:
            verticals.stop()
        if trainer is not None:
            trainer.stop()
        if membership_watch is not None:
            membership_watch.stop()
        debouncer.stop()
        broker.close()
        engine.dispose()

    app = FastAPI(title="Tributary hub", version=__version__, lifespan=lifespan,
                  description="Register spokes and algorithms, launch federated experiments "
                              "and read their aggregated results.")
    app.add_middleware(StrictTransportSecurity, max_age=settings.hsts_seconds)
    # events first: its /api/experiments/events must not be taken for an experiment id
    for router in (events.router, spokes.router, algorithms.router, experiments.router,
                   results.router, audit.router, audit.quarantine_router,
                   algorithms.publishers_router, auth.router, people.router, counts.router,
                   deadletters.router, registry.router, training.router,
                   training_models.router, training_events.router, catalog.router,
                   access_requests.router, vertical.router):
        app.include_router(router)
    app.include_router(psi.router)
    app.include_router(web_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(SignInRequired)
    async def _to_login(request: Request, exc: SignInRequired) -> RedirectResponse:
        return RedirectResponse("/login", status_code=303)

    @app.get("/api/hub/key", tags=["health"], response_class=PlainTextResponse)
    def hub_key() -> str:
        """The hub's public key (PEM) that spokes pin; compare its key id out of band."""
        return app.state.signing_key.public.pem

    @app.get("/api/health", tags=["health"])
    def health() -> dict[str, object]:
        return {"status": "ok", "version": __version__,
                "hub_keyid": app.state.signing_key.keyid,
                "broker_connected": app.state.broker.connected}

    return app
