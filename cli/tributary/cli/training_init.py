"""The algorithm's own initial model for ``tributary training launch --init-from-algorithm``:
the approved version's image, pulled by digest, runs its ``init`` task in the SDK's
sandbox (no network, read-only, no data mounted: an empty cohort) on the coordinator's
machine, and its parameters, read strictly, become the study's initial model. Nothing of
any site is involved, so no spoke runs a task outside a round, and the hub keeps signing
every global model it sends, the first included."""

from __future__ import annotations

import subprocess
from typing import Any

import httpx

from tributary.protocol.training.tensors import encode_tensors
from tributary_algorithm.tools.localtrain import TrainingSite, run_training_task
from tributary_algorithm.training import RoundConfig


class InitError(Exception):
    """The version cannot give an initial model (the message says why)."""


def version_image(client: httpx.Client, algorithm_id: int) -> tuple[str, dict[str, Any]]:
    """The approved, unrevoked version's image reference (``repository@digest``) and its
    record, from the hub; refused otherwise (the hub refuses such a launch anyway)."""
    response = client.get(f"/api/algorithms/{algorithm_id}")
    if response.status_code == 404:
        raise InitError(f"no algorithm version {algorithm_id} is registered")
    response.raise_for_status()
    version = response.json()
    label = f"{version['name']} {version['version']}"
    if version.get("revoked_at"):
        raise InitError(f"{label} is revoked")
    if not version.get("approval"):
        raise InitError(f"{label} is not approved")
    return f"{version['repository']}@{version['digest']}", version


def initial_model(image: str, timeout: float = 600.0, memory_mb: int = 2048,
                  docker: str = "docker") -> tuple[bytes, int]:
    """Pull ``image`` by digest and run its ``init`` task in the sandbox; the initial model
    (safetensors bytes) and its parameter count."""
    pulled = subprocess.run([docker, "pull", "--quiet", image], capture_output=True,
                            text=True, check=False)
    if pulled.returncode != 0:
        raise InitError(f"pulling {image} failed: {pulled.stderr.strip()[-500:]}")
    result = run_training_task(image, TrainingSite("init", ()),
                               RoundConfig(round=0, task="init"), None, timeout=timeout,
                               memory_mb=memory_mb, docker=docker)
    if not result.ok or not result.parameters:
        raise InitError(f"the init task failed: {result.problem or 'no parameters'}\n"
                        f"{result.stderr.strip()[-2000:]}")
    count = sum(int(a.size) for a in result.parameters.values())
    return encode_tensors(result.parameters), count
