"""Data access requests: coordinators file them (multipart: the fields and the ethics
approval and DPIA files), the data access committee decides, the requester may withdraw.
A request, its attachments and its history are shown only to its requester, the
committee and administrators; every read of an attachment is audited."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import Response
from pydantic import ValidationError
from sqlmodel import Session, select

from tributary.hub.deps import current_user, get_or_404, get_session, get_settings, require
from tributary.hub.models import AccessAttachment, AccessRequest, Role, User
from tributary.hub.schemas import AccessDecisionBody, AccessRequestRead, AccessWithdrawBody
from tributary.hub.services import access_files, access_requests, audit
from tributary.hub.settings import HubSettings

router = APIRouter(prefix="/api/access-requests", tags=["access requests"],
                   dependencies=[Depends(current_user)])

#: Room for the form's text fields beside the two files.
_FORM_OVERHEAD_BYTES = 256 * 1024


def _readable(session: Session, request_id: str, user: User) -> AccessRequest:
    request = get_or_404(session, AccessRequest, request_id, "access request")
    if not access_requests.may_read(user, request):
        raise HTTPException(403, f"{user.username} may not read access request "
                                 f"{request_id}: only its requester, the data access "
                                 "committee and administrators")
    return request


def _listed(values: list[str]) -> list[str]:
    """Repeated fields, each possibly comma-separated, blanks dropped."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _upload(upload: UploadFile, kind: str, max_bytes: int) -> access_files.CheckedFile:
    """Read at most one byte more than allowed, then check the content."""
    content = upload.file.read(max_bytes + 1)
    try:
        return access_files.check(kind, upload.filename, content, max_bytes)
    except access_files.AttachmentRefused as exc:
        status = 413 if len(content) > max_bytes else 422
        raise HTTPException(status, str(exc)) from None


@router.post("", status_code=201, response_model=AccessRequestRead)
def file_request(request: Request,
                 title: str = Form(..., max_length=200),
                 purpose: str = Form(..., max_length=10_000),
                 spokes: list[str] = Form(...),
                 attributes: list[str] = Form([]),
                 study_kinds: list[str] = Form(...),
                 epsilon: float | None = Form(None),
                 k: int | None = Form(None),
                 ethics: UploadFile = File(..., description="The ethics approval (PDF, "
                                                            "PNG or JPEG)."),
                 dpia: UploadFile = File(..., description="The data protection impact "
                                                          "assessment (PDF, PNG or JPEG)."),
                 session: Session = Depends(get_session),
                 settings: HubSettings = Depends(get_settings),
                 user: User = Depends(require(Role.COORDINATOR))) -> AccessRequestRead:
    """File a data access request for the committee (multipart/form-data)."""
    limit = settings.access_attachment_max_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > 2 * limit + _FORM_OVERHEAD_BYTES:
        raise HTTPException(413, f"the request is too large: each file is at most {limit} "
                                 "bytes")
    try:
        spec = access_requests.RequestSpec(
            title=title, purpose=purpose, spokes=_listed(spokes),
            attributes=_listed(attributes), study_kinds=_listed(study_kinds),
            epsilon=epsilon, k=k)
    except ValidationError as exc:
        raise HTTPException(422, "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])) from None
    files = [_upload(ethics, "ethics", limit), _upload(dpia, "dpia", limit)]
    try:
        filed = access_requests.create(session, user, spec, files)
    except access_requests.AccessError as exc:
        raise HTTPException(422, str(exc)) from None
    session.commit()
    return access_requests.read(session, filed)


@router.get("", response_model=list[AccessRequestRead])
def list_requests(session: Session = Depends(get_session),
                  user: User = Depends(current_user)) -> list[AccessRequestRead]:
    """The committee and administrators see every request; others their own."""
    return [access_requests.read(session, r)
            for r in access_requests.visible_requests(session, user)]


@router.get("/{request_id}", response_model=AccessRequestRead)
def get_request(request_id: str, session: Session = Depends(get_session),
                user: User = Depends(current_user)) -> AccessRequestRead:
    return access_requests.read(session, _readable(session, request_id, user))


def _transition(session: Session, request_id: str, user: User,
                change: Callable[[AccessRequest], object]) -> AccessRequestRead:
    request = _readable(session, request_id, user)
    try:
        change(request)
    except access_requests.AccessForbidden as exc:
        session.rollback()
        audit.record(session, user.username, "access.refused_action", request_id,
                     reason=str(exc))
        session.commit()
        raise HTTPException(403, str(exc)) from None
    except access_requests.AccessError as exc:
        session.rollback()
        raise HTTPException(409, str(exc)) from None
    session.commit()
    session.refresh(request)
    return access_requests.read(session, request)


@router.post("/{request_id}/decision", response_model=AccessRequestRead)
def decide(request_id: str, body: AccessDecisionBody,
           session: Session = Depends(get_session),
           settings: HubSettings = Depends(get_settings),
           user: User = Depends(require(Role.COMMITTEE))) -> AccessRequestRead:
    """A committee member approves with conditions or refuses with a reason; the request
    is approved once ``TRIBUTARY_HUB_ACCESS_COMMITTEE_QUORUM`` members approved the same
    conditions. The requester and administrators cannot decide."""
    return _transition(session, request_id, user, lambda r: access_requests.decide(
        session, r, user, body, settings.access_committee_quorum))


@router.post("/{request_id}/withdraw", response_model=AccessRequestRead)
def withdraw(request_id: str, body: AccessWithdrawBody | None = None,
             session: Session = Depends(get_session),
             user: User = Depends(current_user)) -> AccessRequestRead:
    """The requester withdraws the request: nothing more launches under it."""
    reason = (body or AccessWithdrawBody()).reason
    return _transition(session, request_id, user,
                       lambda r: access_requests.withdraw(session, r, user, reason))


@router.get("/{request_id}/attachments/{kind}", response_class=Response)
def attachment(request_id: str, kind: str, session: Session = Depends(get_session),
               user: User = Depends(current_user)) -> Response:
    """The ethics approval or DPIA as filed (a download, never rendered in the hub's
    pages); each read is audited."""
    _readable(session, request_id, user)
    found = session.exec(select(AccessAttachment).where(
        AccessAttachment.request_id == request_id, AccessAttachment.kind == kind)).first()
    if found is None:
        raise HTTPException(404, f"no {kind!r} attachment on {request_id}")
    audit.record(session, user.username, "access.attachment_read", request_id, kind=kind,
                 digest=found.digest)
    session.commit()
    return Response(found.content, media_type=found.media_type, headers={
        "Content-Disposition": f'attachment; filename="{found.filename}"',
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox; default-src 'none'",
        "Cache-Control": "no-store", "X-Attachment-Digest": found.digest})
