"""The hub's DCAT-AP export of the federated catalog validates against the official
DCAT-AP 3.0.1 SHACL shapes (vendored in tests/shapes), mandatory properties included, and
the validation does catch an export missing one."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyshacl
from rdflib import Graph
from rdflib.namespace import DCAT, DCTERMS, RDF

from tributary.hub.models import Spoke, SpokeCatalogEntry
from tributary.hub.services.dcat import catalog_jsonld
from tributary.protocol.cohorts.catalog import (
    CountCell,
    ReleaseTerms,
    SpokeDescription,
    YearRange,
)

SHAPES = Path(__file__).parents[1] / "shapes" / "dcat-ap-3.0.1" / "dcat-ap-SHACL.ttl"
TERMS = ReleaseTerms(min_cell=5, counts_enabled=True, steward_approves_experiments=True,
                     steward_reviews_results=False, log_tails=False,
                     max_output_bytes=1 << 20, training=False)


def validate(document: dict) -> tuple[bool, str]:
    data = Graph().parse(data=json.dumps(document), format="json-ld")
    conforms, _, text = pyshacl.validate(data, shacl_graph=Graph().parse(SHAPES),
                                         inference="none", abort_on_first=False)
    return bool(conforms), str(text)


def entries() -> list[tuple[SpokeCatalogEntry, Spoke]]:
    now = datetime.now(UTC)
    big = SpokeDescription(
        spoke_id="north", generated_at=now, terms=TERMS, cases=40, studies=41, series=80,
        cells=[CountCell(modality="CT", cases=40), CountCell(body_part="CHEST", cases=33),
               CountCell(modality="CT", body_part="CHEST", cases=33)],
        years=YearRange(first=2024, last=2026), deid_profile="PS3.15 E.1 Basic Profile",
        deid_options=["113100"], attributes=["nodules"])
    small = SpokeDescription(spoke_id="clare", generated_at=now, terms=TERMS)
    return [(SpokeCatalogEntry(spoke_id=d.spoke_id, digest=d.digest(),
                               description=d.model_dump(mode="json"), envelope={},
                               message_id="m", generated_at=now),
             Spoke(id=d.spoke_id, name=d.spoke_id, institution=institution))
            for d, institution in ((big, "North Hospital"), (small, ""))]


def test_the_export_validates_against_the_dcat_ap_shapes() -> None:
    document = catalog_jsonld("https://hub.example", entries(), "Tributary hub")
    assert document["@context"]["dcat"] == str(DCAT)
    conforms, report = validate(document)
    assert conforms, report
    graph = Graph().parse(data=json.dumps(document), format="json-ld")
    datasets = set(graph.subjects(RDF.type, DCAT.Dataset))
    assert len(datasets) == 2
    for dataset in datasets:  # DCAT-AP's mandatory dataset properties, and ours
        for prop in (DCTERMS.title, DCTERMS.description, DCTERMS.publisher,
                     DCTERMS.accessRights, DCAT.distribution):
            assert graph.value(dataset, prop) is not None, (dataset, prop)
    catalog = next(graph.subjects(RDF.type, DCAT.Catalog))
    for prop in (DCTERMS.title, DCTERMS.description, DCTERMS.publisher):
        assert graph.value(catalog, prop) is not None
    assert len(set(graph.objects(catalog, DCAT.dataset))) == 2


def test_the_validation_catches_a_missing_mandatory_property() -> None:
    document = catalog_jsonld("https://hub.example", entries(), "Tributary hub")
    graph = Graph().parse(data=json.dumps(document), format="json-ld")
    for dataset in graph.subjects(RDF.type, DCAT.Dataset):
        graph.remove((dataset, DCTERMS.title, None))
    conforms, _, text = pyshacl.validate(graph, shacl_graph=Graph().parse(SHAPES),
                                         inference="none")
    assert not conforms and "title" in str(text)
