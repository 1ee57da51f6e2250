"""Where local services live and listen. Every value can be overridden with a
``TRIBUTARY_`` environment variable (e.g. ``TRIBUTARY_BROKER_PORT``)."""

import os
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "tributary"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRIBUTARY_")

    state_dir: Path = _default_state_dir()
    host: str = "127.0.0.1"
    broker_port: int = 61613
    registry_port: int = 5000
    #: With token auth (a secure registry) the registry itself listens on this loopback port
    #: and the registry gateway serves ``registry_port`` with TLS.
    registry_internal_port: int = 5001
    #: The object store's S3 gateway (HTTPS, on ``host``); its other ports stay on loopback.
    objectstore_port: int = 8333
    #: Preferred port of the redis Celery broker (a free one is taken if this is busy).
    redis_port: int = 6390
    #: Preferred port of the PostgreSQL cluster for a hub database (same rule).
    postgres_port: int = 5499
    #: Image algorithm Dockerfiles are built FROM on this machine.
    base_image: str = "tributary/python-base:3.11"
    #: Tried first when the base image is missing; Docker Hub may be unreachable.
    upstream_base_image: str = "python:3.11-slim"
    debian_suite: str = "bookworm"

    @property
    def registry(self) -> str:
        return f"{self.host}:{self.registry_port}"

    def path(self, *parts: str) -> Path:
        p = self.state_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
