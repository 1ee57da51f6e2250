"""Counts cannot be differenced (issue 10, item 11), against a real hub, broker and spoke.
With k = 5, "cases over all" and "cases over all but case X" would single out X; so would
two selections narrowed by slice counts that differ by one case. The hub refuses case ids
and ``max_cases`` in counts early, and the spoke, which does not trust the hub, refuses them
too, and refuses any answer within k of an earlier one for the same requester."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tributary.protocol.auditlog import read_entries
from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.destinations import spoke_queue
from tributary.protocol.messages import CohortSelection, CountRequest
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal
from tributary.services.settings import ServiceSettings
from tributary.spoke.catalog import Catalog
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


def _wait(federation: LocalFederation, query_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with federation.api() as api:
        while True:
            count = api.get(f"/api/counts/{query_id}").raise_for_status().json()
            if count["complete"]:
                return count["spokes"][0]
            assert time.monotonic() < deadline, f"count {query_id} unanswered: {count}"
            time.sleep(0.3)


def _spoke_answer(federation: LocalFederation, spoke_id: str, query_id: str,
                  timeout: float = 60) -> dict[str, Any]:
    """What the spoke's own audit log says it answered to ``query_id``."""
    log = federation.root / "spokes" / spoke_id / "audit.jsonl"
    deadline = time.monotonic() + timeout
    while True:
        for _, entry in read_entries(log):
            if entry and entry["action"] == "count.answered" and entry["target"] == query_id:
                return entry["detail"]
        assert time.monotonic() < deadline, f"the spoke never answered {query_id}"
        time.sleep(0.3)


def test_counts_cannot_be_differenced(federation: LocalFederation, unique: str,
                                      service_settings: ServiceSettings) -> None:
    spoke_id = f"cdiff-{unique}"
    data = federation.root / "count-data" / spoke_id
    generate_cohort(data, 6, seed=410, site=spoke_id, size=64, slices=40)
    thin = federation.root / "count-data" / f"{spoke_id}-thin"
    generate_cohort(thin, 1, seed=411, site=f"{spoke_id}-thin", size=64, slices=20)
    config = federation.add_spoke(spoke_id, data, counts={"min_cell": 5})
    with config.open("a") as toml:  # a second folder: one case with fewer slices
        toml.write(f'\n[[sources]]\nkind = "folder"\nname = "thin"\npath = "{thin}"\n')
    federation.start_spoke(spoke_id, config)

    with federation.api() as api:
        everything = api.post("/api/counts", json={"spoke_ids": [spoke_id]})
        assert everything.status_code == 201, everything.text
        assert _wait(federation, everything.json()["id"])["count"] == 7
        with Catalog(federation.root / "spokes" / spoke_id / "catalog.db") as catalog:
            case_ids = sorted(c.case_id for c in catalog.cases())
        # "All but case X": refused by the hub before anything is sent.
        all_but_one = api.post("/api/counts", json={
            "spoke_ids": [spoke_id], "selection": {"case_ids": case_ids[1:]}})
        assert all_but_one.status_code == 422, all_but_one.text
        assert "case_ids" in all_but_one.text
        capped = api.post("/api/counts", json={
            "spoke_ids": [spoke_id], "selection": {"max_cases": 6}})
        assert capped.status_code == 422, capped.text
        # Narrowing by slice count leaves out one case: the spoke refuses to answer.
        narrowed = api.post("/api/counts", json={
            "spoke_ids": [spoke_id], "selection": {"min_slices": 30}})
        assert narrowed.status_code == 201, narrowed.text
        answer = _wait(federation, narrowed.json()["id"])
        assert answer["count"] is None and answer["state"] == "refused", answer
        assert "differ" in answer["reason"]
        # A selection far from every earlier one is answered as before.
        assert _wait(federation, api.post("/api/counts", json={
            "spoke_ids": [spoke_id], "selection": {"modality": "MR"}}
        ).raise_for_status().json()["id"])["fewer_than"] == 5

    # A hub (or anyone holding its key) that sends case ids anyway is refused by the spoke.
    forged = CountRequest(query_id=f"cnt-forged-{unique}", spoke_id=spoke_id,
                          requested_by="admin",
                          selection=CohortSelection(case_ids=case_ids[1:]))
    client = StompClient(BrokerSettings(host=service_settings.host,
                                        port=service_settings.broker_port), "attacker")
    client.start(wait=30)
    try:
        client.publish(spoke_queue(spoke_id, federation.federation),
                       seal(forged, SigningKey.load(federation.hub_key_path)))
    finally:
        client.close()
    detail = _spoke_answer(federation, spoke_id, forged.query_id)
    assert detail["reported_count"] is None and "case_ids" in detail["refused"], detail
    assert detail["requested_by"] == "admin"
