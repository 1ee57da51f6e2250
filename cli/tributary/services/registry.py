"""An OCI registry (Debian's ``docker-registry``, the CNCF distribution server) on
loopback. The Docker engine trusts loopback registries without TLS."""

from __future__ import annotations

from importlib import resources

from tributary.services.settings import ServiceSettings
from tributary.services.system import (
    ServiceError,
    ensure_commands,
    port_open,
    read_pid,
    start_daemon,
    stop_daemon,
    wait_for,
)


def ensure_running(settings: ServiceSettings) -> str:
    pidfile = settings.path("registry", "registry.pid")
    if read_pid(pidfile) is not None and port_open(settings.host, settings.registry_port):
        return "running"
    if port_open(settings.host, settings.registry_port):
        raise ServiceError(
            f"port {settings.registry_port} is taken by another process; "
            "set TRIBUTARY_REGISTRY_PORT to use another"
        )
    ensure_commands({"docker-registry": "docker-registry"})
    data = settings.path("registry", "data", "x").parent
    data.mkdir(parents=True, exist_ok=True)
    template = resources.files("tributary.services").joinpath("registry.yml").read_text()
    config = settings.path("registry", "config.yml")
    config.write_text(
        template.replace("@DATA@", str(data))
        .replace("@HOST@", settings.host)
        .replace("@PORT@", str(settings.registry_port))
    )
    log = settings.path("registry", "registry.log")
    start_daemon(["docker-registry", "serve", str(config)], pidfile, log)
    wait_for(lambda: port_open(settings.host, settings.registry_port), 30, "the registry", log)
    return "started"


def stop(settings: ServiceSettings) -> bool:
    return stop_daemon(settings.path("registry", "registry.pid"))


def describe(settings: ServiceSettings) -> tuple[bool, str]:
    if port_open(settings.host, settings.registry_port):
        return True, f"http://{settings.registry}"
    return False, "not running"
