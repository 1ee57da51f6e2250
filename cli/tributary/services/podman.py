"""Podman (Debian's ``podman``) serving its Docker-compatible API on a unix socket of its
own, for spokes whose ``[execution] engine`` is ``podman`` and for Slurm jobs, which run
the same Podman on the compute node.

Everything lives in one folder: ``containers.conf`` (no default ulimits: the ones Podman
would set cannot be applied inside these machines' containers), ``storage.conf`` (overlay,
its own image store) and ``registries.conf`` (the project's loopback registry, which
speaks plain HTTP). :func:`environment` is what any ``podman`` command needs to use them,
so a Slurm job's Podman sees the images the API service pulled. Rootful here; a site
that wants rootless Podman starts ``podman system service`` as its spoke's user and points
``podman_socket`` at that user's socket."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path

from tributary.services.settings import ServiceSettings
from tributary.services.system import (
    ServiceError,
    ensure_commands,
    read_pid,
    start_daemon,
    stop_daemon,
    wait_for,
)


def folder(settings: ServiceSettings) -> Path:
    return settings.path("podman", "x").parent


def socket_path(settings: ServiceSettings) -> Path:
    return folder(settings) / "podman.sock"


def socket_url(settings: ServiceSettings) -> str:
    """``unix://…``: the spoke's ``[execution] podman_socket``."""
    return f"unix://{socket_path(settings)}"


def environment(settings: ServiceSettings) -> dict[str, str]:
    """The variables that make a ``podman`` command use this folder's configuration."""
    base = folder(settings)
    return {"CONTAINERS_CONF": str(base / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(base / "registries.conf")}


def _write_config(settings: ServiceSettings) -> None:
    base = folder(settings)
    (base / "containers.conf").write_text("[containers]\ndefault_ulimits = []\n")
    (base / "storage.conf").write_text(
        '[storage]\ndriver = "overlay"\n'
        f"graphroot = {json.dumps(str(base / 'storage'))}\n"
        f"runroot = {json.dumps(str(base / 'run'))}\n")
    # The loopback registry of `tributary services up` speaks HTTP; every other registry
    # is reached over HTTPS as usual (its CA in /etc/containers/certs.d, see registry.py).
    local = [settings.registry, f"localhost:{settings.registry_port}"]
    registries = "unqualified-search-registries = []\n" + "".join(
        f'\n[[registry]]\nlocation = "{where}"\ninsecure = true\n' for where in local)
    (base / "registries.conf").write_text(registries)


def answers(settings: ServiceSettings) -> bool:
    """Whether the API socket answers ``/_ping``."""
    path = socket_path(settings)
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(str(path))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
            status = sock.recv(64).split(b"\r\n", 1)[0]
        except OSError:
            return False
    return status.startswith(b"HTTP/1.") and b" 200" in status


def ensure_running(settings: ServiceSettings | None = None) -> str:
    """Install Podman if missing and start its API service unless ours runs; returns the
    socket's URL."""
    settings = settings or ServiceSettings()
    pidfile = settings.path("podman", "podman.pid")
    if read_pid(pidfile) is not None and answers(settings):
        return socket_url(settings)
    stop_daemon(pidfile)
    ensure_commands({"podman": "podman"})
    _write_config(settings)
    with contextlib.suppress(FileNotFoundError):
        socket_path(settings).unlink()
    log = settings.path("podman", "podman.log")
    env = {**os.environ, **environment(settings)}
    start_daemon([shutil.which("podman") or "podman", "system", "service", "--time=0",
                  socket_url(settings)], pidfile, log, env=env)
    try:
        wait_for(lambda: answers(settings), 60, "the Podman API service", log)
    except ServiceError:
        stop_daemon(pidfile)
        raise
    return socket_url(settings)


def stop(settings: ServiceSettings | None = None) -> bool:
    return stop_daemon((settings or ServiceSettings()).path("podman", "podman.pid"))


def describe(settings: ServiceSettings) -> tuple[bool, str]:
    if read_pid(settings.path("podman", "podman.pid")) is not None and answers(settings):
        return True, socket_url(settings)
    return False, "not running (`tributary services podman`)"
