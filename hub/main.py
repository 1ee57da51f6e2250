"""The hub application: REST API, pages, and the results consumer in the same process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from tributary import __version__
from tributary.hub.api import algorithms, audit, experiments, spokes
from tributary.hub.db import make_engine
from tributary.hub.services.audit import attach_forensic_log
from tributary.hub.services.ingest import ResultsConsumer
from tributary.hub.settings import HubSettings
from tributary.hub.web import router as web_router
from tributary.protocol.broker import StompClient
from tributary.protocol.signing import SigningKey

log = logging.getLogger(__name__)


def create_app(settings: HubSettings | None = None) -> FastAPI:
    settings = settings or HubSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        forensic = attach_forensic_log(engine, settings.audit_log_path())
        if forensic is not None:
            forensic.append("hub", "hub.started", detail={"version": __version__})
        key = SigningKey.load_or_create(settings.signing_key)
        broker = StompClient(settings.broker(), "hub").start()
        app.state.settings, app.state.engine, app.state.broker = settings, engine, broker
        app.state.signing_key = key
        if settings.consume_results:
            ResultsConsumer(engine, broker).start()
        yield
        broker.close()
        engine.dispose()

    app = FastAPI(title="Tributary hub", version=__version__, lifespan=lifespan,
                  description="Register spokes and algorithms, launch federated experiments "
                              "and read their aggregated results.")
    for router in (spokes.router, algorithms.router, experiments.router, audit.router,
                   audit.quarantine_router):
        app.include_router(router)
    app.include_router(web_router)

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
