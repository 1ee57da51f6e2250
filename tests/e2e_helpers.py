"""Waiting, a running site and the steward's command line, shared by the end-to-end
tests."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tributary.testbed.federation import LocalFederation, generate_cohort

T = TypeVar("T")


def running_site(federation: LocalFederation, image: tuple[str, str], prefix: str,
                 seed: int, hospital: str) -> tuple[str, Path, dict[str, Any]]:
    """A spoke with two synthetic cases, enrolled and running, and ``image`` registered and
    approved as an algorithm: (spoke id, its config, the algorithm as the API shows it)."""
    spoke_id = f"{prefix}-{uuid.uuid4().hex[:6]}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 2, seed=seed, site=hospital)
    config = federation.add_spoke(spoke_id, data)
    algorithm = federation.register_algorithm(
        name=f"ok-{spoke_id}", version="1", repository=image[0], digest=image[1])
    federation.start_spoke(spoke_id, config)
    return spoke_id, config, algorithm


def wait_for(probe: Callable[[], T], timeout: float, what: str) -> T:
    """The first truthy value ``probe`` returns, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.3)
    return value


def wait_target(federation: LocalFederation, experiment_id: str, state: str,
                reason: str = "", timeout: float = 120) -> dict[str, Any]:
    """The experiment's first target once it is in ``state`` with ``reason`` in its reason;
    fails early if a federation process died."""
    deadline = time.monotonic() + timeout
    with federation.api() as api:
        while True:
            target = api.get(f"/api/experiments/{experiment_id}").json()["targets"][0]
            if target["state"] == state and reason in (target["reason"] or ""):
                return target
            dead = [p for p in federation.processes.values() if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{experiment_id} never reached {state}/{reason}: {target}")
            time.sleep(0.3)


def steward(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The steward's command line, as a person at the site would run it."""
    return subprocess.run([sys.executable, "-m", "tributary.cli", "spoke", "steward", *args,
                           "--config", str(config)], capture_output=True, text=True, timeout=60)


def pending(config: Path) -> dict[str, Any]:
    done = steward(config, "pending", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def add_attribute(data: Path, name: str, value: Callable[[int, dict[str, str]], Any]) -> None:
    """Add a column to a synthetic cohort's ``attributes.csv`` (what the site knows about
    each patient): ``value(row_index, row)`` gives each cell, stored as JSON."""
    with open(data / "attributes.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(data / "attributes.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, [*rows[0], name])
        writer.writeheader()
        writer.writerows({**row, name: json.dumps(value(i, row))} for i, row in enumerate(rows))
