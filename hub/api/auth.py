"""Sign-in (bearer tokens)."""

from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel
from sqlmodel import Session

from tributary.hub.api.deps import current_user, get_session
from tributary.hub.api.people import UserOut, user_out
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


@router.post("/auth/token", response_model=TokenOut)
def sign_in(body: Credentials, session: Session = Depends(get_session)) -> TokenOut:
    issued = users.issue_token(session, body.username, body.password)
    if issued is None:
        raise HTTPException(401, "wrong username or password")
    return TokenOut(access_token=issued[0], expires_at=issued[1])


@router.get("/auth/me", response_model=UserOut)
def me(user: User = Depends(current_user), session: Session = Depends(get_session)) -> UserOut:
    return user_out(session, user)
