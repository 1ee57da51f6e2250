"""The federated catalog end to end: three real spoke processes publish their signed
descriptions through their outboxes and the real broker; the hub keeps them, selects
spokes by facets with an estimated cohort size, carries the selection into the launch
form, and exports DCAT-AP that validates against the official shapes; a spoke whose
catalog grew by k cases publishes again by itself. A small cell never
leaves a spoke, nor does any attribute the site does not release, and a description from
a spoke that is not enrolled is refused and dead-lettered."""

from __future__ import annotations

import csv
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pydicom
import pyshacl
import pytest
from rdflib import Graph
from rdflib.namespace import DCAT, DCTERMS, RDF

from tributary.protocol.auditlog import read_entries
from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.cohorts.catalog import (
    CountCell,
    ReleaseTerms,
    SpokeDescription,
    sign_description,
)
from tributary.protocol.destinations import results_queue
from tributary.protocol.messages import utcnow
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal
from tributary.services.settings import ServiceSettings
from tributary.spoke.config import SpokeConfig
from tributary.spoke.ingest import ingest
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e

SHAPES = Path(__file__).parents[1] / "shapes" / "dcat-ap-3.0.1" / "dcat-ap-SHACL.ttl"
K = 5


def site_data(federation: LocalFederation, spoke_id: str, cases: int, seed: int,
              heads: int = 0) -> Path:
    """A synthetic CT cohort; ``heads`` of its cases become head CTs (a small cell), and
    every case gets a linkage identifier the site does not release."""
    data = federation.root / "catalog-data" / spoke_id
    generate_cohort(data, cases, seed=seed, site=spoke_id, size=64, slices=16)
    for folder in sorted(p for p in data.iterdir() if p.is_dir())[:heads]:
        for path in folder.glob("*.dcm"):
            ds = pydicom.dcmread(path)
            ds.BodyPartExamined = "HEAD"
            ds.save_as(path)
    table = data / "attributes.csv"
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], "linkage_id"])
        writer.writeheader()
        writer.writerows({**row, "linkage_id": f"L{index:06d}"}
                         for index, row in enumerate(rows))
    return data


def wait_for_catalog(federation: LocalFederation, spoke_ids: list[str],
                     timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with federation.api() as api:
        while True:
            catalog = api.get("/api/catalog").raise_for_status().json()
            if set(spoke_ids) <= {s["spoke_id"] for s in catalog["spokes"]}:
                return catalog
            dead = [p for p in federation.processes.values() if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"descriptions missing: {catalog['spokes']}")
            time.sleep(0.5)


def by_spoke(catalog: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["spoke_id"]: s for s in catalog["spokes"]}


def test_three_spokes_publish_and_the_hub_selects_by_facets(
        federation: LocalFederation, unique: str, service_settings: ServiceSettings) -> None:
    north, river, clare = f"knorth-{unique}", f"kriver-{unique}", f"kclare-{unique}"
    layout = {north: (12, 2), river: (6, 0), clare: (3, 0)}  # cases, of which head CTs
    for index, (spoke_id, (cases, heads)) in enumerate(layout.items()):
        data = site_data(federation, spoke_id, cases, 500 + index, heads)
        config = federation.add_spoke(spoke_id, data, institution=f"{spoke_id} Hospital",
                                      counts={"min_cell": K},
                                      steward={"approve_experiments": spoke_id == river})
        ingest(SpokeConfig.load(config))  # the site's own ingest, before the agent starts
        federation.start_spoke(spoke_id, config)
    spokes = list(layout)
    catalog = wait_for_catalog(federation, spokes)
    described = {s: SpokeDescription.model_validate(by_spoke(catalog)[s]["description"])
                 for s in spokes}

    # What each site published. North: 12 CT cases, 10 of the chest and 2 of the head.
    big = described[north]
    assert (big.cases, big.cell("CT", None), big.terms.min_cell) == (12, 12, K)
    assert big.cell("CT", "HEAD") is None and big.cell(None, "HEAD") is None  # small cell
    # ... and not recoverable by subtraction: the chest cell and margin went with it.
    assert big.cell("CT", "CHEST") is None and big.cell(None, "CHEST") is None
    assert "HEAD" not in big.body_parts()
    assert big.years is not None and big.deid_profile and "113100" in big.deid_options
    assert big.attributes == ["nodules"]  # releasable names only, never values
    assert described[river].cell("CT", "CHEST") == 6
    assert described[river].terms.steward_approves_experiments
    assert described[clare].cases is None and described[clare].cells == []  # 3 < k
    text = json.dumps(catalog)
    for secret in ("linkage_id", "nodule_count", "L000001", "NOVAK", "MRN"):
        assert secret not in text

    with federation.api() as api:
        def select(**params: Any) -> dict[str, Any]:
            response = api.get("/api/catalog", params=params)
            assert response.status_code == 200, response.text
            return response.json()

        everything = select(modality="ct")
        everything = {**everything, "spokes": [s for s in everything["spokes"]
                                               if s["spoke_id"] in spokes]}
        matches = {s["spoke_id"]: s["match"] for s in everything["spokes"]}
        assert matches == {north: "yes", river: "yes", clare: "possible"}
        assert set(everything["matching"]) >= {north, river}
        assert by_spoke(everything)[clare]["cases_at_most"] == K - 1
        assert by_spoke(everything)[north]["cases"] == 12

        large = select(modality="CT", min_cases=10)
        assert north in large["matching"] and river not in large["matching"]
        chest = by_spoke(select(modality="CT", body_part="CHEST"))
        assert chest[river]["match"] == "yes" and chest[north]["match"] == "possible"
        assert chest[north]["cases"] is None and chest[north]["cases_at_most"] == 12
        nodules = select(attribute="nodules")
        assert {north, river} <= set(nodules["matching"]) and clare not in nodules["matching"]
        linked = by_spoke(select(attribute="linkage_id"))
        assert all(linked[s]["match"] == "no" for s in spokes)
        assert api.get("/api/catalog", params={"modality": "C<T>"}).status_code == 422

        # The page, its estimate, and the launch form with the matching spokes checked.
        page = api.get("/catalog", params={"modality": "CT", "min_cases": 10})
        assert page.status_code == 200 and "Estimated cohort" in page.text
        assert f"spoke_ids={north}" in page.text and f"spoke_ids={river}" not in page.text
        form = api.get("/experiments/new", params={"spoke_ids": [north], "modality": "CT"})
        assert f'value="{north}" checked' in form.text
        assert f'value="{river}" checked' not in form.text

        # DCAT-AP: one dataset per spoke, validated against the official shapes.
        dcat = api.get("/api/catalog/dcat")
        assert dcat.status_code == 200
        assert dcat.headers["content-type"].startswith("application/ld+json")
        for secret in ("linkage_id", "nodule_count", "HEAD"):
            assert secret not in dcat.text
        data = Graph().parse(data=dcat.text, format="json-ld")
        conforms, _, report = pyshacl.validate(data, shacl_graph=Graph().parse(SHAPES),
                                               inference="none")
        assert conforms, report
        identifiers = {str(data.value(d, DCTERMS.identifier))
                       for d in data.subjects(RDF.type, DCAT.Dataset)}
        assert set(spokes) <= identifiers

        # The signed envelope is kept, and the receipt audited.
        kept = api.get(f"/api/catalog/spokes/{north}").raise_for_status().json()
        assert kept["envelope"]["signatures"] and kept["digest"] == big.digest()
        received = api.get("/api/audit", params={"action": "catalog.received"}).json()
        assert {north, river, clare} <= {a["target"] for a in received}
    spoke_log = federation.root / "spokes" / north / "audit.jsonl"
    assert any(e and e["action"] == "catalog.described" and e["detail"]["true_cases"] == 12
               for _, e in read_entries(spoke_log))

    # River's catalog grows by k cases; the ingest its agent runs before answering a count
    # picks them up, and the spoke publishes a new description on its own.
    river_data = federation.root / "catalog-data" / river
    generate_cohort(river_data / "more", K, seed=599, site=river, size=64, slices=16)
    with federation.api() as api:
        api.post("/api/counts", json={"selection": {"modality": "CT"},
                                      "spoke_ids": [river]}).raise_for_status()
        deadline = time.monotonic() + 90
        while by_spoke(api.get("/api/catalog").json())[river]["description"]["cases"] != 11:
            assert time.monotonic() < deadline, "river's new description did not arrive"
            time.sleep(0.5)
        assert by_spoke(api.get("/api/catalog", params={"modality": "CT"}).json()
                        )[river]["cases"] == 11

    # A description from a spoke that is not enrolled, and one whose inner signature is
    # not the spoke's own key: both refused and dead-lettered, neither kept.
    client = StompClient(BrokerSettings(host=service_settings.host,
                                        port=service_settings.broker_port), "forger")
    client.start(wait=30)
    try:
        terms = ReleaseTerms(min_cell=K, counts_enabled=True,
                             steward_approves_experiments=False,
                             steward_reviews_results=False, log_tails=True,
                             max_output_bytes=1024, training=False)
        stranger = f"kstranger-{unique}"
        fake = SpokeDescription(spoke_id=stranger, generated_at=utcnow(), terms=terms,
                                cases=500, cells=[CountCell(modality="MR", cases=500)])
        outsider = SigningKey.generate()
        client.publish(results_queue(federation.federation),
                       seal(sign_description(fake, outsider), outsider))
        # North's enrolled key on the outside, a stranger's key on the description.
        north_key = SigningKey.load(federation.root / "spokes" / north / "spoke.key")
        inflated = fake.model_copy(update={"spoke_id": north})
        marker = uuid.uuid4().hex[:8]
        message = sign_description(inflated, outsider).model_copy(
            update={"message_id": f"forged-{marker}"})
        client.publish(results_queue(federation.federation), seal(message, north_key))
    finally:
        client.close()
    deadline = time.monotonic() + 60
    with federation.api() as api:
        while True:
            rejected = api.get("/api/audit", params={"action": "message.rejected"}).json()
            reasons = [a["detail"]["reason"] for a in rejected]
            inner = [r for r in reasons if "catalog description refused" in r]
            if inner and any("not an active enrolled key" in r for r in reasons):
                break
            assert time.monotonic() < deadline, reasons
            time.sleep(0.5)
        catalog = api.get("/api/catalog").json()
        assert stranger not in {s["spoke_id"] for s in catalog["spokes"]}
        assert by_spoke(catalog)[north]["description"]["cases"] == 12
        quarantined = api.get("/api/quarantine", params={"spoke": north}).json()
        assert any("catalog description refused" in q["reason"] for q in quarantined)
