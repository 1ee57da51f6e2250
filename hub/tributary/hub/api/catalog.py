"""The federated catalog: what each spoke published of what it holds, selected by facets,
with an estimated cohort size, and the same as DCAT-AP JSON-LD."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from sqlmodel import Session

from tributary.hub.deps import current_user, get_or_404, get_session
from tributary.hub.models import SpokeCatalogEntry
from tributary.hub.schemas import CatalogRead
from tributary.hub.services.catalog import Facets, catalog_entries, catalog_read
from tributary.hub.services.dcat import catalog_jsonld

router = APIRouter(prefix="/api/catalog", tags=["catalog"], dependencies=[Depends(current_user)])


def facets(modality: str | None = Query(None, description="A modality, e.g. CT."),
           body_part: str | None = Query(None, description="A body part, e.g. CHEST."),
           attribute: list[str] = Query(default_factory=list, description=(
               "Attribute names every selected spoke must offer (repeatable).")),
           min_cases: int | None = Query(None, ge=0, description=(
               "Only spokes that published at least this many matching cases."))) -> Facets:
    try:
        return Facets.parse(modality, body_part, attribute, min_cases)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


@router.get("", response_model=CatalogRead)
def get_catalog(selected: Facets = Depends(facets),
                session: Session = Depends(get_session)) -> CatalogRead:
    """Every spoke's latest published description, judged against the facets, and the
    estimated cohort size: the sum of the published counts of the matching spokes, plus
    at most ``possible_more`` at spokes whose count is withheld."""
    return catalog_read(session, selected)


@router.get("/dcat", response_class=JSONResponse, responses={200: {
    "content": {"application/ld+json": {}}}})
def get_dcat(request: Request, session: Session = Depends(get_session)) -> JSONResponse:
    """The catalog as DCAT-AP 3 JSON-LD: one dcat:Dataset per spoke."""
    base = str(request.base_url).rstrip("/")
    document = catalog_jsonld(base, catalog_entries(session), "Tributary hub")
    return JSONResponse(document, media_type="application/ld+json")


@router.get("/spokes/{spoke_id}")
def get_signed_description(spoke_id: str,
                           session: Session = Depends(get_session)) -> dict[str, Any]:
    """A spoke's description with the DSSE envelope it signed, as received: anyone holding
    the spoke's public key can check one against the other."""
    entry = get_or_404(session, SpokeCatalogEntry, spoke_id, "catalog description")
    return {"spoke_id": entry.spoke_id, "digest": entry.digest,
            "received_at": entry.received_at, "message_id": entry.message_id,
            "description": entry.description, "envelope": entry.envelope}
