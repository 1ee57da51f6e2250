"""The container engine a spoke talks to: the local Docker engine, or Podman through its
Docker-compatible API socket (``podman system service``, rootful or rootless). Both speak
the same API, so the runner's isolation flags, limits and image checks are the same.

Clients are made per case (a client is not shared between threads), but the engine's API
version is asked once per engine and pinned afterwards: asking costs a round trip per
client, and on a trivial case that is a measurable share of the spoke's overhead."""

from __future__ import annotations

import threading
from typing import Any

import docker
import docker.utils

from tributary.spoke.config import ExecutionSettings

_versions: dict[str, str] = {}
_lock = threading.Lock()


def engine_kwargs(execution: ExecutionSettings) -> dict[str, Any]:
    """How to reach the configured engine: Podman's socket, or Docker as the environment
    says (``DOCKER_HOST`` and friends, else the default socket)."""
    if execution.engine == "podman":
        return {"base_url": execution.podman_socket}
    return dict(docker.utils.kwargs_from_env())


def engine_client(execution: ExecutionSettings, timeout: int = 120) -> docker.DockerClient:
    """A client of the configured engine; raises ``docker.errors.DockerException`` when it
    does not answer."""
    kwargs = engine_kwargs(execution)
    key = str(kwargs.get("base_url") or "default")
    version = _versions.get(key)
    client = docker.DockerClient(**kwargs, version=version or "auto", timeout=timeout)
    if version is None:
        with _lock:
            _versions[key] = client.api.api_version
    return client


def engine_name(execution: ExecutionSettings) -> str:
    """For messages: "Docker engine" or "Podman"."""
    return "Podman" if execution.engine == "podman" else "Docker engine"
