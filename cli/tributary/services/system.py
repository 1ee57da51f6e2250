"""Small process and package helpers shared by the service modules."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tributary.services.settings import ServiceSettings

T = TypeVar("T")

_apt_updated = False


class ServiceError(RuntimeError):
    """A service could not be installed, started or stopped; the message says why."""


def ensure_commands(packages: dict[str, str]) -> None:
    """Install the Debian package behind each missing command (command -> package)."""
    missing = sorted({pkg for cmd, pkg in packages.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise ServiceError(f"missing Debian packages {missing}; run as root to install them")
    global _apt_updated
    if not _apt_updated:
        apt_get("update", "-qq")
        _apt_updated = True
    apt_get("install", "-y", "-qq", *missing)


#: How long apt-get waits for another apt-get (a second test worker installing another
#: service, the machine's own updates) to release dpkg's lock, rather than failing at once.
APT_LOCK_WAIT_S = 900


def apt_get(*args: str) -> None:
    """Run apt-get non-interactively, waiting for dpkg's lock when another one holds it."""
    subprocess.run(["apt-get", "-o", f"DPkg::Lock::Timeout={APT_LOCK_WAIT_S}", *args],
                   check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                   stdout=subprocess.DEVNULL)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def recorded_port(pidfile: Path, portfile: Path, host: str) -> int | None:
    """The port a daemon of ours recorded when it started, if it still runs and answers
    there (so a second start reuses it)."""
    if read_pid(pidfile) is None or not portfile.exists():
        return None
    port = int(portfile.read_text())
    return port if port_open(host, port) else None


def preferred_port(host: str, preferred: int) -> int:
    """``preferred`` if nothing listens on it, else a free port."""
    return free_port(host) if port_open(host, preferred) else preferred


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    hint = ""
    if log is not None and log.exists():
        lines = log.read_text(errors="replace").splitlines()[-15:]
        hint = "\n--- last log lines ---\n" + "\n".join(lines)
    raise ServiceError(f"{what} did not become ready within {timeout:.0f} s{hint}")


def read_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    if _is_zombie(pid):  # it died; its parent (the process that started it) never reaped it
        return None
    return pid


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def start_daemon(cmd: Sequence[str], pidfile: Path, logfile: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> int:
    """Start a background process that outlives this one, recording its pid (``env``
    replaces the inherited environment when given)."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=cwd, env=env,
        )
    pidfile.write_text(str(proc.pid))
    return proc.pid


def stop_daemon(pidfile: Path, timeout: float = 20.0) -> bool:
    """Stop the process recorded in ``pidfile``; True if one was running."""
    pid = read_pid(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and read_pid(pidfile) is not None:
        _reap(pid)
        time.sleep(0.2)
    if read_pid(pidfile) is not None:
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        _reap(pid)
    pidfile.unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def one_starter(name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Make a service's ``ensure_running(settings, ...)`` run in one process at a time per
    state folder (an exclusive lock file there): two test workers, or a demo and a test,
    asking for the same service at once would otherwise both find it stopped and both
    install or start it, and one would fail on the other's port or dpkg lock."""

    def decorate(ensure: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(ensure)
        def locked(settings: ServiceSettings | None = None, *args: Any, **kwargs: Any) -> T:
            settings = settings or ServiceSettings()
            settings.state_dir.mkdir(parents=True, exist_ok=True)
            with open(settings.state_dir / f".{name}.start.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                return ensure(settings, *args, **kwargs)

        return locked

    return decorate
