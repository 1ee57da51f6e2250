"""What sign-in needs over HTTP, for the API's token route and the dashboard's form alike:
throttled password checks, the session cookie's flags and CSRF protection for everything a
browser posts with that cookie (double-submit: a random token in a same-site cookie that a
cross-site page can neither read nor set, repeated in the form field or the
``X-CSRF-Token`` header)."""

from __future__ import annotations

import hmac
import secrets
from datetime import datetime

from fastapi import HTTPException, Request, Response
from sqlalchemy.engine import Engine
from sqlmodel import Session

from tributary.hub.services import users
from tributary.hub.services.throttle import SignInThrottle
from tributary.hub.settings import HubSettings

TOKEN_COOKIE = "tributary_token"
CSRF_COOKIE = "tributary_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def make_throttle(settings: HubSettings, engine: Engine) -> SignInThrottle:
    """The hub's sign-in throttle, counting in its database (shared by its web processes)."""
    return SignInThrottle(engine, settings.signin_window_seconds,
                          settings.signin_max_failures_per_user,
                          settings.signin_max_failures_per_address)


def client_address(request: Request) -> str:
    """The caller's address (uvicorn puts a trusted proxy's X-Forwarded-For here)."""
    return request.client.host if request.client else "unknown"


def sign_in(request: Request, session: Session, username: str,
            password: str) -> tuple[str, datetime] | None:
    """A new token, None for wrong credentials; HTTP 429 while the user or address is
    throttled (checked before the password, so a throttled guess learns nothing)."""
    throttle: SignInThrottle = request.app.state.signin_throttle
    address = client_address(request)
    wait = throttle.retry_after(username, address)
    if wait is not None:
        raise HTTPException(429, f"too many failed sign-ins; try again in {wait} s",
                            headers={"Retry-After": str(wait)})
    issued = users.issue_token(session, username, password)
    if issued is None:
        throttle.failed(username, address)
    else:
        throttle.succeeded(username)
    return issued


def cookie_secure(request: Request) -> bool:
    """Secure whenever the hub is reached over HTTPS (or configured to insist)."""
    settings: HubSettings = request.app.state.settings
    return settings.cookie_secure or request.url.scheme == "https"


def csrf_token(request: Request) -> str:
    """The browser's CSRF token: its cookie's, or a new one (set by :func:`set_csrf_cookie`)."""
    token = getattr(request.state, "csrf_token", None) or request.cookies.get(CSRF_COOKIE, "")
    if not 32 <= len(token) <= 128:
        token = secrets.token_urlsafe(32)
    request.state.csrf_token = token
    return token


def set_csrf_cookie(request: Request, response: Response, token: str | None = None) -> None:
    token = token or csrf_token(request)
    if request.cookies.get(CSRF_COOKIE) != token:
        response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict",
                            secure=cookie_secure(request))


def csrf_ok(request: Request, submitted: str | None) -> bool:
    expected = request.cookies.get(CSRF_COOKIE)
    return bool(expected and submitted) and hmac.compare_digest(
        expected.encode(), (submitted or "").encode())


def check_csrf_header(request: Request) -> None:
    """For API calls authenticated by the cookie: unsafe methods need the header too."""
    if request.method not in SAFE_METHODS and not csrf_ok(request,
                                                         request.headers.get(CSRF_HEADER)):
        raise HTTPException(403, f"CSRF token missing or wrong: send the {CSRF_HEADER} "
                                 "header, or authenticate with a bearer token")
