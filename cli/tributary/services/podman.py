"""Podman (Debian's ``podman``) serving its Docker-compatible API on a unix socket of its
own, for spokes whose ``[execution] engine`` is ``podman`` and for Slurm jobs, which run
the same Podman on the compute node.

Everything lives in one folder: ``containers.conf`` (no default ulimits: the ones Podman
would set cannot be applied inside these machines' containers), ``storage.conf`` (overlay,
its own image store) and ``registries.conf`` (the project's loopback registry, which
speaks plain HTTP). :func:`environment` is what any ``podman`` command needs to use them,
so a Slurm job's Podman sees the images the API service pulled.

:func:`ensure_rootless` starts a rootless one instead: as an unprivileged system user of
its own (created, with a subordinate uid/gid range, if missing), its configuration in that
user's ``~/.config/containers``, its images in the user's home and its socket in its
runtime folder. Containers' users then map into the subordinate range (the algorithm's
65534 appears as :func:`mapped_uid`)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

from tributary.services.settings import ServiceSettings
from tributary.services.system import (
    ServiceError,
    ensure_commands,
    one_starter,
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


def answers(settings: ServiceSettings, path: Path | None = None) -> bool:
    """Whether the API socket (ours, or at ``path``) answers ``/_ping``."""
    path = path or socket_path(settings)
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


@one_starter("podman")
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
    # In a folder of its own: conmon inherits the service's working directory and fails
    # every container start ("Failed to get working directory") once the folder the
    # service was started from is removed.
    start_daemon([shutil.which("podman") or "podman", "system", "service", "--time=0",
                  socket_url(settings)], pidfile, log, cwd=log.parent, env=env)
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


#: The system user a rootless Podman of this project runs as, and the start of its
#: subordinate uid/gid range when the project assigns one.
ROOTLESS_USER = "tributary-podman"
SUBORDINATE_START = 300000
SUBORDINATE_COUNT = 65536


def _subordinate_start(user: str, table: Path) -> int | None:
    for line in table.read_text().splitlines() if table.exists() else []:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] == user:
            return int(fields[1])
    return None


def _ensure_user(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        pass
    subprocess.run(["useradd", "--system", "--create-home", "--home-dir",
                    f"/var/lib/{user}", "--shell", "/usr/sbin/nologin", user], check=True,
                   capture_output=True)
    return pwd.getpwnam(user)


def _ensure_subordinate(user: str) -> None:
    for table in (Path("/etc/subuid"), Path("/etc/subgid")):
        if _subordinate_start(user, table) is not None:
            continue
        taken = [int(f[1]) + int(f[2]) for f in (
            line.split(":") for line in (table.read_text().splitlines()
                                         if table.exists() else [])) if len(f) == 3]
        start = max([SUBORDINATE_START, *taken])
        with open(table, "a") as handle:
            handle.write(f"{user}:{start}:{SUBORDINATE_COUNT}\n")


def mapped_uid(user: str = ROOTLESS_USER) -> int:
    """The host uid a rootless container's user 65534 appears as: the spoke's
    ``[execution] algorithm_uid`` for that Podman."""
    start = _subordinate_start(user, Path("/etc/subuid"))
    if start is None:
        raise ServiceError(f"{user} has no subordinate uid range in /etc/subuid")
    return start + 65534 - 1


def rootless_socket(user: str = ROOTLESS_USER) -> Path:
    return Path(f"/run/user/{pwd.getpwnam(user).pw_uid}/podman/podman.sock")


@one_starter("podman-rootless")
def ensure_rootless(settings: ServiceSettings | None = None,
                    user: str = ROOTLESS_USER) -> str:
    """Start a rootless Podman API service as ``user`` unless it runs; returns the socket's
    URL. Needs root to create the user, its subordinate range and runtime folder."""
    settings = settings or ServiceSettings()
    pidfile = settings.path("podman-rootless", f"{user}.pid")
    ensure_commands({"podman": "podman", "newuidmap": "uidmap"})
    account = _ensure_user(user)
    sock = rootless_socket(user)
    if read_pid(pidfile) is not None and answers(settings, sock):
        return f"unix://{sock}"
    stop_daemon(pidfile)
    _ensure_subordinate(user)
    home = Path(account.pw_dir)
    config = home / ".config" / "containers"
    runtime = sock.parent.parent
    for made in (config, runtime, sock.parent):
        made.mkdir(parents=True, exist_ok=True)
        os.chown(made, account.pw_uid, account.pw_gid)
    os.chown(config.parent, account.pw_uid, account.pw_gid)
    runtime.chmod(0o700)
    _write_config(settings)
    for name in ("containers.conf", "registries.conf"):
        shutil.copyfile(folder(settings) / name, config / name)
        os.chown(config / name, account.pw_uid, account.pw_gid)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    env = {"HOME": str(home), "USER": user, "XDG_RUNTIME_DIR": str(runtime),
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    log = settings.path("podman-rootless", f"{user}.log")
    start_daemon(["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                  "--init-groups", shutil.which("podman") or "podman", "system", "service",
                  "--time=0", f"unix://{sock}"], pidfile, log, cwd=home, env=env)
    try:
        wait_for(lambda: answers(settings, sock), 60, "the rootless Podman API service", log)
    except ServiceError:
        stop_daemon(pidfile)
        raise
    return f"unix://{sock}"


def stop_rootless(settings: ServiceSettings | None = None, user: str = ROOTLESS_USER) -> bool:
    settings = settings or ServiceSettings()
    return stop_daemon(settings.path("podman-rootless", f"{user}.pid"))
