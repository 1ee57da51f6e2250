"""An OCI registry (Debian's ``docker-registry``, the CNCF distribution server).

Open mode: on loopback without TLS (the Docker engine trusts loopback registries).
Secure mode (:class:`TokenAuth`): the registry listens on loopback on an internal port and
accepts only tokens of the hub's token service; the registry gateway (``tributary hub
registry-gateway``, started by :func:`ensure_gateway`) serves the published port with TLS.
:func:`trust_ca` makes the local Docker engine and Podman trust the federation CA for it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

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

#: Where the Docker engine and Podman look for a registry's CA (``<dir>/<host:port>/ca.crt``).
DOCKER_CERTS_DIR = Path("/etc/docker/certs.d")
PODMAN_CERTS_DIR = Path("/etc/containers/certs.d")


@dataclass(frozen=True)
class TokenAuth:
    """distribution's token auth: the hub's token service and what signs its tokens."""

    #: Where clients get tokens: the gateway's ``https://<published host:port>/token``
    #: (forwarded to the hub) or the hub's ``/api/registry/token``.
    realm: str
    #: The registry's certificate bundle of token signers (the hub's token certificate or
    #: the CA that issued it).
    rootcertbundle: Path
    service: str = "tributary-registry"
    issuer: str = "tributary-hub"


@dataclass(frozen=True)
class GatewayOptions:
    """The TLS front of a secure registry (``tributary hub registry-gateway``)."""

    cert_file: Path
    key_file: Path
    auth: TokenAuth
    #: The hub the gateway forwards ``/token`` to, and the CA its certificate chains to.
    hub_url: str | None = None
    hub_ca_file: Path | None = None
    #: Address the gateway listens on (the registry's published address).
    listen: str | None = None


def _write_config(settings: ServiceSettings, auth: TokenAuth | None) -> Path:
    data = settings.path("registry", "data", "x").parent
    data.mkdir(parents=True, exist_ok=True)
    name = "registry.yml" if auth is None else "registry-token.yml"
    text = resources.files("tributary.services").joinpath(name).read_text()
    text = text.replace("@DATA@", str(data)).replace("@HOST@", settings.host)
    if auth is None:
        text = text.replace("@PORT@", str(settings.registry_port))
    else:
        for field, value in (("REALM", auth.realm), ("SERVICE", auth.service),
                             ("ISSUER", auth.issuer), ("ROOTS", str(auth.rootcertbundle))):
            if '"' in value or "\n" in value:
                raise ServiceError(f"registry {field.lower()} must not contain quotes")
            text = text.replace(f"@{field}@", value)
        text = text.replace("@PORT@", str(settings.registry_internal_port))
    config = settings.path("registry", "config.yml")
    config.write_text(text)
    return config


def ensure_running(settings: ServiceSettings, auth: TokenAuth | None = None) -> str:
    """Start the registry unless it runs; with ``auth``, on the internal loopback port with
    token auth (start the gateway with :func:`ensure_gateway` for clients to reach it)."""
    port = settings.registry_port if auth is None else settings.registry_internal_port
    host = settings.host if auth is None else "127.0.0.1"
    pidfile = settings.path("registry", "registry.pid")
    if read_pid(pidfile) is not None and port_open(host, port):
        return "running"
    if port_open(host, port):
        raise ServiceError(f"port {port} is taken by another process; set "
                           f"TRIBUTARY_REGISTRY_{'' if auth is None else 'INTERNAL_'}PORT "
                           "to use another")
    ensure_commands({"docker-registry": "docker-registry"})
    config = _write_config(settings, auth)
    log = settings.path("registry", "registry.log")
    start_daemon(["docker-registry", "serve", str(config)], pidfile, log)
    wait_for(lambda: port_open(host, port), 30, "the registry", log)
    return "started"


def ensure_gateway(settings: ServiceSettings, options: GatewayOptions) -> str:
    """Start the registry gateway on the published port unless it runs."""
    pidfile = settings.path("registry", "gateway.pid")
    listen = options.listen or settings.host
    if read_pid(pidfile) is not None and port_open(listen, settings.registry_port):
        return "running"
    if port_open(listen, settings.registry_port):
        raise ServiceError(f"port {settings.registry_port} is taken by another process; "
                           "set TRIBUTARY_REGISTRY_PORT to use another")
    cmd = [sys.executable, "-m", "tributary.cli", "hub", "registry-gateway",
           "--cert", str(options.cert_file), "--key", str(options.key_file),
           "--upstream", f"http://127.0.0.1:{settings.registry_internal_port}",
           "--roots", str(options.auth.rootcertbundle), "--realm", options.auth.realm,
           "--host", listen, "--port", str(settings.registry_port)]
    if options.hub_url:
        cmd += ["--hub-url", options.hub_url]
    if options.hub_ca_file:
        cmd += ["--hub-ca-file", str(options.hub_ca_file)]
    cmd += ["--issuer", options.auth.issuer, "--service", options.auth.service]
    log = settings.path("registry", "gateway.log")
    start_daemon(cmd, pidfile, log)
    wait_for(lambda: port_open(listen, settings.registry_port), 30, "the registry gateway", log)
    return "started"


def stop(settings: ServiceSettings) -> bool:
    gateway = stop_daemon(settings.path("registry", "gateway.pid"))
    return stop_daemon(settings.path("registry", "registry.pid")) or gateway


def describe(settings: ServiceSettings) -> tuple[bool, str]:
    gateway = read_pid(settings.path("registry", "gateway.pid")) is not None
    if port_open(settings.host, settings.registry_port):
        return True, f"{'https' if gateway else 'http'}://{settings.registry}"
    return False, "not running"


def trust_ca(registry: str, ca_file: Path,
             roots: tuple[Path, ...] = (DOCKER_CERTS_DIR, PODMAN_CERTS_DIR)) -> list[Path]:
    """Make the Docker engine and Podman trust ``ca_file`` for ``registry`` (``host:port``):
    ``<root>/<host:port>/ca.crt``, rewritten only when it differs. Returns what changed."""
    if "/" in registry or registry.startswith("."):
        raise ServiceError(f"not a registry address: {registry!r}")
    data = ca_file.read_bytes()
    changed = []
    for root in roots:
        target = root / registry / "ca.crt"
        if target.exists() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name("ca.crt.tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o644)
        tmp.replace(target)
        changed.append(target)
    return changed
