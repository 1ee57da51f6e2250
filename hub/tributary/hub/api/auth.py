"""Sign-in (bearer tokens)."""

from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel
from sqlmodel import Session

from tributary.hub import signin
from tributary.hub.api.people import UserOut, user_out
from tributary.hub.deps import current_user, get_session, presented_token
from tributary.hub.models import User
from tributary.hub.services import users

router = APIRouter(prefix="/api", tags=["auth"])


class Credentials(BaseModel):
    username: str
    password: str


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_at: datetime


@router.post("/auth/token", response_model=TokenOut,
             responses={429: {"description": "Too many failed sign-ins (see Retry-After)"}})
def sign_in(body: Credentials, request: Request,
            session: Session = Depends(get_session)) -> TokenOut:
    """A bearer token (12 hours). Failed attempts are throttled per user and per address."""
    issued = signin.sign_in(request, session, body.username, body.password)
    if issued is None:
        raise HTTPException(401, "wrong username or password")
    return TokenOut(access_token=issued[0], expires_at=issued[1])


@router.post("/auth/logout", status_code=204)
def sign_out(user: User = Depends(current_user), token: str | None = Depends(presented_token),
             session: Session = Depends(get_session)) -> Response:
    """Revoke the token this request presents: it is refused from now on."""
    if token:
        users.revoke_token(session, token, user.username)
    return Response(status_code=204)


@router.get("/auth/me", response_model=UserOut)
def me(user: User = Depends(current_user), session: Session = Depends(get_session)) -> UserOut:
    return user_out(session, user)
