"""The README's main command, end to end at a small size: services, a signed image, three
spokes (the last one on Podman, `tributary demo --podman`), one study and its aggregate, as
processes through the generated mutual-TLS broker.
The same study as containers is ``make demo-containers`` in test_demo_containers_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from tributary.testbed.demo import run_demo
from tributary.testbed.federation import LocalFederation, free_port

pytestmark = pytest.mark.e2e
SPOKES = ("northfield", "riverside", "stclare")


def test_demo_runs_a_study_to_its_aggregate(tmp_path: Path) -> None:
    created = {spoke: LocalFederation.watch_containers(f"org.tributary.spoke={spoke}")
               for spoke in SPOKES}
    memberships: dict[str, dict] = {}

    def membership(federation: LocalFederation, _hub_side: object) -> None:
        with federation.api() as api:
            for spoke in SPOKES:
                memberships[spoke] = api.get(f"/api/spokes/{spoke}/credential").json()

    with open(tmp_path / "demo.log", "w") as log:
        report = run_demo([2, 1, 1], hub_port=free_port(), wait=False,
                          workdir=tmp_path / "demo", console=Console(file=log),
                          podman=True, after_study=membership)
    # Every spoke was enrolled and targeted as a member: its credential, checked at launch.
    assert {s: m["state"] for s, m in memberships.items()} == dict.fromkeys(SPOKES, "valid")
    assert all(m["required"] and m["issuer"].startswith("did:web:authority.")
               for m in memberships.values())
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == report
    pooled = report["groups"]["pooled"]
    assert (pooled["cases"], pooled["succeeded"], pooled["failed"]) == (4, 4, 0)
    assert set(report["groups"]) == {*SPOKES, "pooled"}
    for spoke in SPOKES:
        # Every spoke checked the publisher's signature before running anything...
        audit = tmp_path / "demo" / "spokes" / spoke / "audit.jsonl"
        entries = [json.loads(line) for line in audit.read_text().splitlines()]
        verified = [e for e in entries if e["action"] == "image.verified"]
        assert verified and all(e["detail"]["result"] == "verified" for e in verified)
        # ...and asked its engine for the algorithm's containers: Podman for the last.
        engines = {e["detail"]["engine"] for e in entries if e["action"] == "container.started"}
        assert engines == {"podman" if spoke == SPOKES[-1] else "docker"}
        assert bool(created[spoke].stop()) == (spoke != SPOKES[-1])
    assert (tmp_path / "demo" / "broker" / "jaas" / "users.properties").exists()
