"""The README's main command, end to end at a small size: services, a signed image, a
mutual-TLS broker, three spokes, one study and its aggregate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from tributary.demo import run_demo
from tributary.federation import free_port

pytestmark = pytest.mark.e2e


def test_demo_runs_a_study_to_its_aggregate(tmp_path: Path) -> None:
    report = run_demo([2, 1, 1], hub_port=free_port(), wait=False, workdir=tmp_path / "demo",
                      console=Console(file=open(tmp_path / "demo.log", "w")))  # noqa: SIM115
    pooled = report["groups"]["pooled"]
    assert (pooled["cases"], pooled["succeeded"], pooled["failed"]) == (4, 4, 0)
    assert set(report["groups"]) == {"northfield", "riverside", "stclare", "pooled"}
    # Every spoke checked the publisher's signature (found beside the image) before running.
    for spoke in ("northfield", "riverside", "stclare"):
        audit = tmp_path / "demo" / "spokes" / spoke / "audit.jsonl"
        entries = [json.loads(line) for line in audit.read_text().splitlines()]
        verified = [e for e in entries if e["action"] == "image.verified"]
        assert verified and all(e["detail"]["result"] == "verified" for e in verified)
    assert (tmp_path / "demo" / "broker" / "jaas" / "users.properties").exists()
