"""What every dashboard page shares: the templates and their filters, the signed-in user
a page needs, and rendering with the role flags and CSRF token every form uses. The
page modules (``pages``, ``access``, ``catalog``, ``psi``, ``training``, ``vertical``)
import it; none reaches into another."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.templating import Jinja2Templates
from sqlmodel import Session

from tributary.hub.deps import bearer_scheme, current_user, get_session
from tributary.hub.models import Role, User
from tributary.hub.signin import csrf_token, set_csrf_cookie

templates = Jinja2Templates(directory=Path(__file__).parents[1] / "templates")
#: Colour class of each state, shared by every page (see dashboard.css).
STATE_CLASS = {"succeeded": "ok", "completed": "ok", "approved": "ok", "online": "ok",
               "failed": "fail", "refused": "fail", "revoked": "fail", "rejected": "fail",
               "offline": "fail", "cancelled": "fail", "running": "run", "accepted": "run",
               "cancelling": "run", "held": "wait", "answered": "ok",
               "launched": "run", "published": "wait", "queued": "wait", "pending": "wait",
               "draft": "wait"}
templates.env.globals["state_class"] = lambda state: STATE_CLASS.get(str(state), "wait")


def _facts(values: dict[str, Any]) -> str:
    """``{"max_cases": 5, "case_ids": None}`` as "max cases 5": set values only."""
    def show(value: Any) -> str:
        return json.dumps(value) if isinstance(value, list | dict) else str(value)

    return " · ".join(f"{key.replace('_', ' ')} {show(value)}"
                      for key, value in values.items() if value is not None)


templates.env.filters["facts"] = _facts


class SignInRequired(Exception):
    """Raised by page dependencies; the app turns it into a redirect to /login."""


def page_user(request: Request, session: Session = Depends(get_session),
              credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)) -> User:
    try:
        return current_user(request, credentials, session)
    except HTTPException:
        raise SignInRequired from None


def can(user: User, *roles: Role) -> bool:
    """Whether ``user`` holds one of ``roles`` (an admin holds them all)."""
    return Role.ADMIN in user.roles or any(r in user.roles for r in roles)


def render(request: Request, name: str, user: User | None, status_code: int = 200,
           **context: Any) -> HTMLResponse:
    """``name`` rendered with the user's role flags and a fresh CSRF token (set as a cookie
    too): every form and every script's API call sends it back."""
    flags = {role.value: user is not None and can(user, role) for role in Role}
    token = csrf_token(request)  # in every form, and for the page's script's API calls
    response = templates.TemplateResponse(
        request, name, {"user": user, "can": flags, "csrf_token": token, **context},
        status_code=status_code)
    set_csrf_cookie(request, response, token)
    return response
