"""The federated catalog page: spokes selected by facets, what each published, the
estimated cohort size, and a link that carries the matching spokes into the launch form."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from sqlmodel import Session

from tributary.hub.deps import get_session
from tributary.hub.models import User
from tributary.hub.services.catalog import Facets, catalog_read
from tributary.hub.web.rendering import page_user, render

router = APIRouter(include_in_schema=False)


@router.get("/catalog", response_class=HTMLResponse)
def catalog_page(request: Request, modality: str = "", body_part: str = "",
                 attribute: list[str] = Query(default_factory=list), min_cases: str = "",
                 session: Session = Depends(get_session),
                 user: User = Depends(page_user)) -> HTMLResponse:
    """As GET /api/catalog, for people."""
    error = ""
    try:
        facets = Facets.parse(modality, body_part, attribute,
                              int(min_cases) if min_cases.strip() else None)
    except ValueError as exc:
        error, facets = str(exc), Facets()
    view = catalog_read(session, facets)
    launch = "/experiments/new?" + urlencode(
        [("spoke_ids", s) for s in view.matching]
        + ([("modality", facets.modality)] if facets.modality else []))
    return render(request, "catalog.html", user, view=view, facets=facets, error=error,
                   launch=launch if view.matching else "")
