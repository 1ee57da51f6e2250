"""The federated catalog as DCAT-AP 3 (JSON-LD), as European health imaging catalogues
publish theirs: one ``dcat:Catalog`` of the hub with one ``dcat:Dataset`` per spoke. The
publisher of each dataset is its institution; ``dct:temporal`` the generalised years;
keywords and themes the modalities (DICOM DCM concepts) and body parts; access is
restricted and the one distribution says how to reach the data: they stay at the site,
algorithms go to them through the hub. Counts are the spoke's published ones only
(HealthDCAT-AP's number of unique individuals; nothing when withheld).

The graph is built with rdflib and serialised with its JSON-LD serialiser under an
explicit context, so the export is plain JSON to a reader that ignores RDF."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from rdflib import BNode, Graph, Literal, Namespace, URIRef
from rdflib.namespace import DCAT, DCTERMS, FOAF, RDF, RDFS, SKOS, XSD

from tributary.hub.models import Spoke, SpokeCatalogEntry
from tributary.protocol.cohorts.catalog import UNSPECIFIED, SpokeDescription

#: HealthDCAT-AP (the European Health Data Space's DCAT-AP extension).
HEALTHDCATAP = Namespace("http://healthdataportal.eu/ns/health#")
ACCESS_RIGHTS = URIRef(
    "http://publications.europa.eu/resource/authority/access-right/RESTRICTED")
HEALTH_THEME = URIRef("http://publications.europa.eu/resource/authority/data-theme/HEAL")
DATA_THEMES = URIRef("http://publications.europa.eu/resource/authority/data-theme")
DICOM_SCHEME = URIRef("http://dicom.nema.org/resources/ontology/DCM")

CONTEXT: dict[str, Any] = {
    "dcat": str(DCAT), "dct": str(DCTERMS), "foaf": str(FOAF), "skos": str(SKOS),
    "rdfs": str(RDFS), "xsd": str(XSD), "healthdcatap": str(HEALTHDCATAP),
}


def _concept(graph: Graph, iri: URIRef, label: str, scheme: URIRef, title: str) -> URIRef:
    graph.add((iri, RDF.type, SKOS.Concept))
    graph.add((iri, SKOS.prefLabel, Literal(label, lang="en")))
    graph.add((iri, SKOS.inScheme, scheme))
    graph.add((scheme, RDF.type, SKOS.ConceptScheme))
    graph.add((scheme, DCTERMS.title, Literal(title, lang="en")))
    return iri


def _agent(graph: Graph, iri: URIRef, name: str) -> URIRef:
    graph.add((iri, RDF.type, FOAF.Agent))
    graph.add((iri, RDF.type, FOAF.Organization))
    graph.add((iri, FOAF.name, Literal(name, lang="en")))
    return iri


def _summary(description: SpokeDescription) -> str:
    k = description.terms.min_cell
    if description.cases is None:
        return (f"Fewer than {k} de-identified imaging cases (the site withholds counts "
                f"below {k}).")
    parts = ", ".join(description.modalities()) or "none published"
    return (f"{description.cases} de-identified imaging cases ({description.studies} "
            f"studies, {description.series} series); modalities: {parts}. Counts below "
            f"{k}, and those that would reveal them, are withheld. De-identified under "
            f"{description.deid_profile or 'no profile yet'}.")


def _dataset(graph: Graph, base: str, catalog: URIRef, entry: SpokeCatalogEntry,
             spoke: Spoke) -> None:
    description = SpokeDescription.model_validate(entry.description)
    dataset = URIRef(f"{base}/api/catalog/spokes/{quote(spoke.id)}")  # its signed form
    graph.add((catalog, DCAT.dataset, dataset))
    graph.add((dataset, RDF.type, DCAT.Dataset))
    institution = spoke.institution or spoke.name or spoke.id
    graph.add((dataset, DCTERMS.identifier, Literal(spoke.id)))
    graph.add((dataset, DCTERMS.title, Literal(f"Imaging data at {institution}", lang="en")))
    graph.add((dataset, DCTERMS.description, Literal(_summary(description), lang="en")))
    graph.add((dataset, DCTERMS.publisher,
               _agent(graph, URIRef(f"{base}/catalog/institutions/{quote(spoke.id)}"),
                      institution)))
    graph.add((dataset, DCTERMS.modified,
               Literal(entry.generated_at.replace(microsecond=0).isoformat(),
                       datatype=XSD.dateTime)))
    rights = ACCESS_RIGHTS
    graph.add((rights, RDF.type, DCTERMS.RightsStatement))
    graph.add((rights, RDFS.label, Literal("Restricted: algorithms reach the data at the "
                                           "site, after the site's own checks", lang="en")))
    graph.add((dataset, DCTERMS.accessRights, rights))
    graph.add((dataset, DCAT.theme, _concept(graph, HEALTH_THEME, "Health", DATA_THEMES,
                                             "Data theme")))
    for modality in description.modalities():
        graph.add((dataset, DCAT.keyword, Literal(modality, lang="en")))
        graph.add((dataset, DCAT.theme, _concept(
            graph, URIRef(f"{DICOM_SCHEME}/{quote(modality)}"), modality, DICOM_SCHEME,
            "DICOM Controlled Terminology")))
    for part in description.body_parts():
        if part != UNSPECIFIED:
            graph.add((dataset, DCAT.keyword, Literal(part.lower(), lang="en")))
    if description.years is not None:
        period = BNode()
        graph.add((period, RDF.type, DCTERMS.PeriodOfTime))
        graph.add((period, DCAT.startDate, Literal(str(description.years.first),
                                                   datatype=XSD.gYear)))
        graph.add((period, DCAT.endDate, Literal(str(description.years.last),
                                                 datatype=XSD.gYear)))
        graph.add((dataset, DCTERMS.temporal, period))
    if description.deid_profile:
        provenance = BNode()
        graph.add((provenance, RDF.type, DCTERMS.ProvenanceStatement))
        graph.add((provenance, RDFS.label, Literal(
            f"De-identified under {description.deid_profile}", lang="en")))
        graph.add((dataset, DCTERMS.provenance, provenance))
    if description.cases is not None:
        graph.add((dataset, HEALTHDCATAP.numberOfUniqueIndividuals,
                   Literal(description.cases, datatype=XSD.nonNegativeInteger)))
    distribution = URIRef(f"{dataset}#federated")
    graph.add((dataset, DCAT.distribution, distribution))
    graph.add((distribution, RDF.type, DCAT.Distribution))
    graph.add((distribution, DCAT.accessURL,
               URIRef(f"{base}/experiments/new?spoke_ids={quote(spoke.id)}")))
    graph.add((distribution, DCTERMS.title, Literal("Federated analysis", lang="en")))
    graph.add((distribution, DCTERMS.description, Literal(
        "The data stay at the site: approved algorithms run there through the Tributary "
        "hub, and only their outputs and the attributes the site releases leave.",
        lang="en")))


def catalog_graph(base: str, entries: list[tuple[SpokeCatalogEntry, Spoke]],
                  hub_name: str) -> Graph:
    """The DCAT-AP graph of the catalog at ``base`` (the hub's URL, no trailing slash)."""
    graph = Graph()
    for prefix, iri in CONTEXT.items():
        graph.bind(prefix, Namespace(iri))
    catalog = URIRef(f"{base}/catalog")
    graph.add((catalog, RDF.type, DCAT.Catalog))
    graph.add((catalog, DCTERMS.title, Literal(f"{hub_name}: federated catalog", lang="en")))
    graph.add((catalog, DCTERMS.description, Literal(
        "What each site of the federation holds, as each site published it: counts with "
        "small cells withheld, years, de-identification and release terms. The data "
        "themselves stay at the sites.", lang="en")))
    graph.add((catalog, DCTERMS.publisher,
               _agent(graph, URIRef(f"{base}/catalog/publisher"), hub_name)))
    for entry, spoke in entries:
        _dataset(graph, base, catalog, entry, spoke)
    return graph


def catalog_jsonld(base: str, entries: list[tuple[SpokeCatalogEntry, Spoke]],
                   hub_name: str) -> dict[str, Any]:
    """The catalog as a JSON-LD document with an explicit ``@context``."""
    text = catalog_graph(base, entries, hub_name).serialize(format="json-ld",
                                                             context=CONTEXT, auto_compact=True)
    document: dict[str, Any] = json.loads(text)
    return document
