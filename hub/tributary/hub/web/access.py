"""The dashboard's data access pages: the request form (spokes, attributes and kinds can
be preselected by query parameters, so the catalog's pages link here), the list (for the
committee, its queue of requests waiting for a decision first), and one request's page
(state, conditions, attachments, votes, the studies bound to it and the ε spent), with
the committee's decision form and the requester's withdrawal. The forms call
``/api/access-requests``, so a decision from the dashboard is checked and audited as one
from the API or the CLI."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from sqlmodel import Session

from tributary.hub.deps import get_session
from tributary.hub.models import AccessRequest, Role, User
from tributary.hub.services import access_requests
from tributary.hub.services.enrolment import enrolled_spokes
from tributary.hub.services.spokes import spoke_reads
from tributary.hub.web.rendering import STATE_CLASS, can, page_user, render

router = APIRouter(include_in_schema=False)
STATE_CLASS.update({"submitted": "wait", "withdrawn": "fail"})


@router.get("/access-requests", response_class=HTMLResponse)
def access_requests_page(request: Request, session: Session = Depends(get_session),
                         user: User = Depends(page_user)) -> HTMLResponse:
    rows = [access_requests.read(session, r)
            for r in access_requests.visible_requests(session, user)]
    queue = [r for r in rows if r.state == "submitted" and r.requested_by != user.username]
    return render(request, "access_requests.html", user, requests=rows,
                   queue=queue if access_requests.is_member(user) else [],
                   may_request=can(user, Role.COORDINATOR))


@router.get("/access-requests/new", response_class=HTMLResponse)
def new_access_request_page(request: Request, session: Session = Depends(get_session),
                            user: User = Depends(page_user),
                            spokes: list[str] = Query([], max_length=500),
                            attributes: list[str] = Query([], max_length=500),
                            study_kinds: list[str] = Query([], max_length=4),
                            title: str = Query("", max_length=200)) -> HTMLResponse:
    """The form, with ``?spokes=a&spokes=b&attributes=x`` preselected (comma-separated
    values are accepted too)."""
    def listed(values: list[str]) -> list[str]:
        return [v.strip() for value in values for v in value.split(",") if v.strip()]

    return render(request, "access_request_new.html", user,
                   spokes=spoke_reads(session, request.app.state.settings.spoke_online_seconds),
                   enrolled=enrolled_spokes(session), chosen=set(listed(spokes)),
                   attributes=", ".join(listed(attributes)),
                   kinds=set(listed(study_kinds)) or {"validation"}, title=title,
                   max_bytes=request.app.state.settings.access_attachment_max_bytes,
                   may_request=can(user, Role.COORDINATOR))


@router.get("/access-requests/{request_id}", response_class=HTMLResponse)
def access_request_page(request_id: str, request: Request,
                        session: Session = Depends(get_session),
                        user: User = Depends(page_user)) -> HTMLResponse:
    found = session.get(AccessRequest, request_id)
    if found is None or not access_requests.may_read(user, found):
        raise HTTPException(404, "no such access request, or not yours to read")
    read = access_requests.read(session, found)
    may_decide = (access_requests.is_member(user) and Role.ADMIN.value not in user.roles
                  and user.username != found.requested_by and found.state == "submitted"
                  and user.username not in {v.member for v in read.votes})
    return render(request, "access_request.html", user, r=read, may_decide=may_decide,
                   may_withdraw=user.username == found.requested_by
                   and found.state in ("submitted", "approved"),
                   quorum=request.app.state.settings.access_committee_quorum)
