"""Federated counts end to end: a real hub process, three real spoke processes and the real
broker. Each spoke counts its own cases; a small cell arrives only as "fewer than k", and
no case identifier ever reaches the hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tributary.protocol.auditlog import read_entries
from tributary.spoke.catalog import Catalog
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


def _wait_for_count(federation: LocalFederation, query_id: str,
                    timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with federation.api() as api:
        while True:
            count = api.get(f"/api/counts/{query_id}").raise_for_status().json()
            if count["complete"]:
                return count
            dead = [p for p in federation.processes.values() if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"count {query_id} incomplete: {count['spokes']}")
            time.sleep(0.3)


def test_count_across_three_spokes(federation: LocalFederation, unique: str) -> None:
    sizes = {f"cnorth-{unique}": 6, f"criver-{unique}": 5, f"cclare-{unique}": 2}
    data_dirs: dict[str, Path] = {}
    for index, (spoke_id, size) in enumerate(sizes.items()):
        data_dirs[spoke_id] = federation.root / "count-data" / spoke_id
        generate_cohort(data_dirs[spoke_id], size, seed=300 + index, site=spoke_id)
        config = federation.add_spoke(spoke_id, data_dirs[spoke_id], counts={"min_cell": 5})
        federation.start_spoke(spoke_id, config)
    spokes = list(sizes)

    with federation.api() as api:
        everything = api.post("/api/counts", json={"selection": {"modality": "CT"},
                                                   "spoke_ids": spokes})
        assert everything.status_code == 201, everything.text
        # A cap differences out cases: counts refuse it (experiments may still cap).
        capped = api.post("/api/counts", json={"selection": {"modality": "CT", "max_cases": 5},
                                               "spoke_ids": spokes[:2]})
        assert capped.status_code == 422 and "max_cases" in capped.text
        nothing = api.post("/api/counts", json={"selection": {"modality": "MR"},
                                                "spoke_ids": spokes}).raise_for_status()
        # A count needs the coordinator role; a reviewer may not ask.
        reviewer = federation.reviewer_tokens()[0]
        with federation.api(reviewer) as other:
            assert other.post("/api/counts", json={"spoke_ids": spokes}).status_code == 403
        assert api.post("/api/counts", json={"spoke_ids": ["no-such-spoke"]}).status_code == 422

    result = _wait_for_count(federation, everything.json()["id"])
    by_spoke = {s["spoke_id"]: s for s in result["spokes"]}
    assert by_spoke[spokes[0]]["count"] == 6 and by_spoke[spokes[0]]["fewer_than"] is None
    assert by_spoke[spokes[1]]["count"] == 5  # exactly k is reported
    small = by_spoke[spokes[2]]
    assert (small["state"], small["count"], small["fewer_than"]) == ("answered", None, 5)
    assert result["total"] == 11 and not result["total_is_exact"]
    assert result["total_at_most"] == 15 and result["total_text"] == "at least 11"

    none = _wait_for_count(federation, nothing.json()["id"])
    assert all(s["fewer_than"] == 5 and s["count"] is None for s in none["spokes"])
    assert none["total_text"] == "at least 0" and none["total_at_most"] == 12

    # The coordinator's command line shows the same.
    shown = subprocess.run(
        [sys.executable, "-m", "tributary.cli", "counts", "show", everything.json()["id"]],
        capture_output=True, text=True, timeout=60, env={
            **os.environ, "TRIBUTARY_HUB_URL": federation.hub_url,
            "TRIBUTARY_TOKEN": federation.admin_token, "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "fewer than 5" in shown.stdout and "at least 11" in shown.stdout, shown.stdout

    # ... and so does the hub's page.
    with federation.api() as api:
        page = api.get("/counts").text
    assert everything.json()["id"] in page and "at least 11" in page
    assert "fewer than 5" in page and all(spoke_id in page for spoke_id in spokes)
    with federation.api(reviewer) as other:
        assert other.get("/counts").status_code == 403
    # The spokes page shows each spoke's cohort size from its latest count of all cases.
    with federation.api() as api:
        spokes_page = api.get("/spokes").text
    for spoke_id, shown_size in ((spokes[0], ">6<"), (spokes[1], ">5<"), (spokes[2], "&lt; 5")):
        row = spokes_page[spokes_page.index(f">{spoke_id}<"):]
        assert shown_size in row[:row.index("</tr>")], spoke_id

    # The spokes audited each answer with its true count; the hub audited request and replies.
    for spoke_id, size in sizes.items():
        log = federation.root / "spokes" / spoke_id / "audit.jsonl"
        answered = {e["target"]: e["detail"] for _, e in read_entries(log)
                    if e and e["action"] == "count.answered"}
        assert answered[everything.json()["id"]]["true_count"] == size
    with federation.api() as api:
        audit = api.get("/api/audit", params={"target": everything.json()["id"]}).json()
    actions = [(a["action"], a["detail"].get("kind")) for a in audit]
    assert ("count.requested", None) in actions
    assert actions.count(("message.received", "count_reply")) == 3

    # No case pseudonym of any spoke reached the hub's database.
    hub_db = b"".join(p.read_bytes() for p in federation.root.glob("hub.db*"))
    for spoke_id in data_dirs:
        with Catalog(federation.root / "spokes" / spoke_id / "catalog.db") as catalog:
            cases = catalog.cases()
        assert len(cases) == sizes[spoke_id]  # the counts came from the spoke's catalog
        for case in cases:
            assert case.case_id.encode() not in hub_db


class _HeldPacs(ThreadingHTTPServer):
    """A DICOMweb service that answers nothing until the test releases it: an ingest that
    takes as long as the test wants."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.asked.set()
                server.release.wait(120)
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"[]")

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_a_count_waiting_for_its_ingest_holds_up_no_other_message(
        federation: LocalFederation, unique: str) -> None:
    spoke_id = f"cslow-{unique}"
    data = federation.root / "count-data" / spoke_id
    generate_cohort(data, 3, seed=330, site=spoke_id)
    pacs = _HeldPacs()
    threading.Thread(target=pacs.serve_forever, daemon=True).start()
    try:
        config = federation.add_spoke(spoke_id, data, counts={"min_cell": 1})
        with config.open("a") as toml:  # a second source, in the PACS that holds every call
            toml.write(f'\n[[sources]]\nkind = "dicomweb"\nname = "held"\n'
                       f'url = "http://127.0.0.1:{pacs.server_port}/dicom-web"\n'
                       "timeout_seconds = 150\n")
        federation.start_spoke(spoke_id, config)
        with federation.api() as api:
            first = api.post("/api/counts", json={"spoke_ids": [spoke_id]}
                             ).raise_for_status().json()["id"]
            assert pacs.asked.wait(90), "the spoke never started the ingest before its count"
            second = api.post("/api/counts", json={"spoke_ids": [spoke_id],
                                                   "selection": {"modality": "MR"}}
                              ).raise_for_status().json()["id"]
        # The second request reaches the spoke while the first one's ingest is held: the
        # first was journaled and acknowledged at once (the queue's prefetch is one).
        log = federation.root / "spokes" / spoke_id / "audit.jsonl"
        deadline = time.monotonic() + 60
        while not any(e and e["action"] == "message.received" and e["target"] == second
                      for _, e in read_entries(log)):
            assert time.monotonic() < deadline, "the second request never reached the spoke"
            time.sleep(0.3)
        status = subprocess.run(
            [sys.executable, "-m", "tributary.cli", "spoke", "status", "--config",
             str(config), "--json"], capture_output=True, text=True, timeout=60)
        assert json.loads(status.stdout)["journal"]["count_requests"] == 2, status.stdout
        with federation.api() as api:
            assert not api.get(f"/api/counts/{first}").json()["complete"]
    finally:
        pacs.release.set()
    answered = _wait_for_count(federation, first)
    assert answered["spokes"][0]["count"] == 3
    no_mr = _wait_for_count(federation, second)["spokes"][0]
    assert (no_mr["count"], no_mr["fewer_than"]) == (None, 1)  # 0 is below min_cell 1
    pacs.shutdown()
