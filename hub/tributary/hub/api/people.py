"""User and organisation administration (administrators only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from tributary.hub.deps import get_or_404, get_session, require
from tributary.hub.models import Organisation, Role, User
from tributary.hub.services import organisations, users

router = APIRouter(prefix="/api", tags=["users"])


class OrganisationCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)


class OrganisationOut(BaseModel):
    id: int
    name: str


class UserCreate(BaseModel):
    username: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{1,62}$")
    password: str = Field(min_length=12)
    roles: list[Role]
    #: The organisation's id (preferred), or its name: an existing organisation of that
    #: normalised name, else a new one.
    organisation_id: int | None = Field(default=None, ge=1, le=2**63 - 1)
    organisation: str = Field(default="", max_length=200)


class UserOut(BaseModel):
    username: str
    organisation_id: int | None
    organisation: str
    roles: list[str]
    disabled: bool


def user_out(session: Session, user: User) -> UserOut:
    member_of = users.organisation_of(session, user)
    return UserOut(username=user.username, organisation_id=user.organisation_id,
                   organisation=member_of.name if member_of else "", roles=user.roles,
                   disabled=user.disabled)


@router.post("/organisations", status_code=201, response_model=OrganisationOut)
def create_organisation(body: OrganisationCreate, session: Session = Depends(get_session),
                        admin: User = Depends(require())) -> Organisation:
    try:
        organisation = organisations.create(session, body.name, admin.username)
    except organisations.OrganisationError as exc:
        raise HTTPException(409, str(exc)) from None
    session.commit()
    session.refresh(organisation)
    return organisation


@router.get("/organisations", response_model=list[OrganisationOut])
def list_organisations(session: Session = Depends(get_session),
                       _admin: User = Depends(require())) -> list[Organisation]:
    return list(session.exec(select(Organisation).order_by(Organisation.name)))


@router.post("/users", status_code=201, response_model=UserOut)
def create_user(body: UserCreate, session: Session = Depends(get_session),
                admin: User = Depends(require())) -> UserOut:
    try:
        user = users.create_user(session, body.username, body.password,
                                 [r.value for r in body.roles], body.organisation,
                                 actor=admin.username, organisation_id=body.organisation_id)
    except ValueError as exc:
        session.rollback()
        raise HTTPException(422, str(exc)) from None
    return user_out(session, user)


@router.get("/users", response_model=list[UserOut])
def list_users(session: Session = Depends(get_session),
               _admin: User = Depends(require())) -> list[UserOut]:
    return [user_out(session, u) for u in session.exec(select(User).order_by(User.username))]


class TokensRevoked(BaseModel):
    username: str
    revoked: int


def _user_or_404(session: Session, username: str) -> User:
    return get_or_404(session, User, username, "user")


@router.delete("/users/{username}/tokens", response_model=TokensRevoked)
def revoke_user_tokens(username: str, session: Session = Depends(get_session),
                       admin: User = Depends(require())) -> TokensRevoked:
    """Revoke every token of a user (a lost device); the user may sign in again."""
    user = _user_or_404(session, username)
    return TokensRevoked(username=user.username,
                         revoked=users.revoke_tokens(session, user.username, admin.username))


@router.post("/users/{username}/disable", response_model=UserOut)
def disable_user(username: str, session: Session = Depends(get_session),
                 admin: User = Depends(require())) -> UserOut:
    """No more sign-in, and every token the user holds stops working at once."""
    user = _user_or_404(session, username)
    if user.username == admin.username:
        raise HTTPException(409, "administrators cannot disable themselves")
    return user_out(session, users.set_disabled(session, user, True, admin.username))


@router.post("/users/{username}/enable", response_model=UserOut)
def enable_user(username: str, session: Session = Depends(get_session),
                admin: User = Depends(require())) -> UserOut:
    """Allow sign-in again (tokens revoked when disabled stay revoked)."""
    user = _user_or_404(session, username)
    return user_out(session, users.set_disabled(session, user, False, admin.username))
