"""Redis from Debian's ``redis-server`` package, as the Celery broker for aggregation
workers when the hub is configured with one: our own instance, loopback only, protected by
a generated password, no persistence (a lost task is recomputed on the next result or
read). Idempotent: a running instance of ours is reused."""

from __future__ import annotations

from pathlib import Path

from tributary.services.pki import read_or_create_secret
from tributary.services.settings import ServiceSettings
from tributary.services.system import (
    ServiceError,
    ensure_commands,
    one_starter,
    port_open,
    preferred_port,
    recorded_port,
    start_daemon,
    stop_daemon,
    wait_for,
)


def _password(settings: ServiceSettings) -> str:
    return read_or_create_secret(settings.path("redis", "password"))


def url(settings: ServiceSettings, port: int, database: int = 0) -> str:
    return f"redis://:{_password(settings)}@{settings.host}:{port}/{database}"


def _config(settings: ServiceSettings, port: int) -> Path:
    directory = settings.path("redis", "data", "x").parent
    directory.mkdir(parents=True, exist_ok=True)
    config = settings.path("redis", "redis.conf")
    config.touch(mode=0o600)
    config.write_text("\n".join([
        f"bind {settings.host}", "protected-mode yes", f"port {port}",
        f"requirepass {_password(settings)}", f"dir {directory}", 'save ""',
        "appendonly no", "daemonize no", "loglevel notice", "",
    ]))
    return config


@one_starter("redis")
def ensure_running(settings: ServiceSettings | None = None) -> str:
    """Start our redis if it is not running; return its URL (with the password). Listens
    on ``TRIBUTARY_REDIS_PORT`` if that is free, else on a free port, recorded for reuse."""
    settings = settings or ServiceSettings()
    pidfile = settings.path("redis", "redis.pid")
    portfile = settings.path("redis", "port")
    running = recorded_port(pidfile, portfile, settings.host)
    if running is not None:
        return url(settings, running)
    stop_daemon(pidfile)
    ensure_commands({"redis-server": "redis-server"})
    port = preferred_port(settings.host, settings.redis_port)
    log = settings.path("redis", "redis.log")
    start_daemon(["redis-server", str(_config(settings, port))], pidfile, log)
    try:
        wait_for(lambda: port_open(settings.host, port), 30, "redis", log)
    except ServiceError:
        stop_daemon(pidfile)
        raise
    portfile.write_text(str(port))
    return url(settings, port)


def stop(settings: ServiceSettings | None = None) -> bool:
    return stop_daemon((settings or ServiceSettings()).path("redis", "redis.pid"))
