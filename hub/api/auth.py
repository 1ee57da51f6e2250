"""Sign-in (bearer tokens) and user administration."""

from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from tributary.hub.api.deps import current_user, get_session, require
from tributary.hub.models import Role, User
from tributary.hub.services import users

router = APIRouter(prefix="/api", tags=["auth"])


class Credentials(BaseModel):
    username: str
    password: str


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_at: datetime


class UserCreate(BaseModel):
    username: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{1,62}$")
    password: str = Field(min_length=12)
    roles: list[Role]
    organisation: str = ""


class UserOut(BaseModel):
    username: str
    organisation: str
    roles: list[str]
    disabled: bool


@router.post("/auth/token", response_model=TokenOut)
def sign_in(body: Credentials, session: Session = Depends(get_session)) -> TokenOut:
    issued = users.issue_token(session, body.username, body.password)
    if issued is None:
        raise HTTPException(401, "wrong username or password")
    return TokenOut(access_token=issued[0], expires_at=issued[1])


@router.get("/auth/me", response_model=UserOut)
def me(user: User = Depends(current_user)) -> User:
    return user


@router.post("/users", status_code=201, response_model=UserOut)
def create_user(body: UserCreate, session: Session = Depends(get_session),
                admin: User = Depends(require())) -> User:
    try:
        return users.create_user(session, body.username, body.password,
                                 [r.value for r in body.roles], body.organisation,
                                 actor=admin.username)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


@router.get("/users", response_model=list[UserOut])
def list_users(session: Session = Depends(get_session),
               _admin: User = Depends(require())) -> list[User]:
    return list(session.exec(select(User).order_by(User.username)))
