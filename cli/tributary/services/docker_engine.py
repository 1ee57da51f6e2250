"""The Docker engine. An engine that already answers is used as it is; otherwise Debian's
dockerd is started without a bridge or iptables rules, so nothing listens or routes beyond
loopback and algorithm containers run with no network at all."""

from __future__ import annotations

import shutil
import subprocess

from tributary.services.settings import ServiceSettings
from tributary.services.system import (
    ServiceError,
    ensure_commands,
    read_pid,
    start_daemon,
    stop_daemon,
    wait_for,
)


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_running(settings: ServiceSettings) -> str:
    if engine_answers():
        return "running"
    ensure_commands({"dockerd": "docker.io", "docker": "docker.io"})
    if engine_answers():  # the package's own service may have started it
        return "running"
    log = settings.path("docker", "dockerd.log")
    start_daemon(
        ["dockerd", "--bridge=none", "--iptables=false", "--ip-forward=false",
         "--ip-masq=false", "--pidfile", str(settings.path("docker", "dockerd.engine.pid"))],
        settings.path("docker", "dockerd.pid"),
        log,
    )
    wait_for(engine_answers, 60, "the Docker engine", log)
    return "started"


def stop(settings: ServiceSettings) -> bool:
    """Stop the engine only if this project started it."""
    return stop_daemon(settings.path("docker", "dockerd.pid"))


def describe(settings: ServiceSettings) -> tuple[bool, str]:
    ours = read_pid(settings.path("docker", "dockerd.pid")) is not None
    if engine_answers():
        return True, "started by tributary" if ours else "provided by the system"
    if ours:
        return False, "dockerd process running but not answering"
    return False, "not running"


def require_engine() -> None:
    if not engine_answers():
        raise ServiceError("the Docker engine is not running: run `tributary services up`")
