"""The registry's token service (distribution's token authentication): ``GET
/api/registry/token?service=...&scope=...`` with HTTP Basic credentials, as Docker, Podman
and other OCI clients call it. Policy: :mod:`tributary.hub.services.registry_access`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from sqlmodel import Session

from tributary.hub.deps import get_session, get_settings
from tributary.hub.services import registry_access
from tributary.hub.services.registry_client import token_signer
from tributary.hub.services.registry_tokens import TokenError, parse_scope
from tributary.hub.settings import HubSettings
from tributary.hub.signin import client_address

router = APIRouter(prefix="/api/registry", tags=["registry"])
basic = HTTPBasic(auto_error=False)


def _error(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Basic realm="tributary registry"'} if status == 401 else {}
    return JSONResponse({"errors": [{"code": code, "message": message}], "detail": message},
                        status_code=status, headers=headers)


@router.get("/token", responses={401: {"description": "Missing or refused credentials"}})
def registry_token(
    request: Request,
    service: str | None = None,
    scope: Annotated[list[str], Query()] = [],  # noqa: B006 - FastAPI reads it, never mutated
    account: str | None = None,
    credentials: HTTPBasicCredentials | None = Depends(basic),
    session: Session = Depends(get_session),
    settings: HubSettings = Depends(get_settings),
) -> JSONResponse:
    """A registry token for what the caller may do of ``scope`` (none of it: a token with
    no access, which the registry then refuses). Anonymous callers are refused."""
    signer = token_signer(settings)
    if signer is None:
        return _error(404, "UNSUPPORTED", "this hub has no registry token service")
    if service is not None and service != signer.service:
        return _error(400, "UNSUPPORTED", f"this hub issues tokens for {signer.service!r}")
    if credentials is None:
        registry_access.record_refusal(session, "", "anonymous")
        return _error(401, "UNAUTHORIZED", "registry access needs credentials")
    username = credentials.username
    if account and account != username:
        registry_access.record_refusal(session, username, f"account {account!r} mismatch")
        return _error(401, "UNAUTHORIZED", "account does not match the credentials")
    throttle = request.app.state.signin_throttle
    address = client_address(request)
    wait = throttle.retry_after(username, address)
    if wait is not None:
        return JSONResponse({"detail": f"too many failed sign-ins; try again in {wait} s"},
                            status_code=429, headers={"Retry-After": str(wait)})
    try:
        principal = registry_access.authenticate(session, username, credentials.password,
                                                 signer.service)
    except registry_access.AccessRefused as exc:
        throttle.failed(username, address)
        registry_access.record_refusal(session, username, str(exc))
        return _error(401, "UNAUTHORIZED", "credentials refused")
    throttle.succeeded(username)
    try:
        scopes = [parse_scope(item) for text in scope for item in text.split()]
    except TokenError as exc:
        return _error(400, "INVALID_SCOPE", str(exc))
    issued = registry_access.issue(session, settings, signer, principal, scopes[:16])
    return JSONResponse(issued.body())
