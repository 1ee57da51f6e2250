"""FastAPI dependencies of the REST API's routes and the dashboard's pages alike: database
session, broker client, the authenticated user and the roles a route requires."""

from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from tributary.hub.models import Experiment, Role, User
from tributary.hub.services.users import user_for_token
from tributary.hub.settings import HubSettings
from tributary.hub.signin import TOKEN_COOKIE, check_csrf_header
from tributary.protocol.broker import StompClient

bearer_scheme = HTTPBearer(auto_error=False)


M = TypeVar("M")

#: Row ids are SQL BIGINTs: a larger number is refused as invalid input (422), never
#: passed to the database driver (which would fail with a server error).
MAX_ROW_ID = 2**63 - 1
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]


def get_or_404(session: Session, model: type[M], key: Any, what: str) -> M:
    """The row of ``model`` with primary key ``key``, or a 404 naming what is missing."""
    row = session.get(model, key)
    if row is None:
        raise HTTPException(404, f"no {what} {key!r}")
    return row


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


def get_broker(request: Request) -> StompClient:
    return request.app.state.broker


def get_settings(request: Request) -> HubSettings:
    return request.app.state.settings


def current_user(request: Request,
                 credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
                 session: Session = Depends(get_session)) -> User:
    """The user behind the bearer token (or the dashboard's token cookie), attached to the
    request's session. The token is checked on a connection of its own, returned at once:
    FastAPI runs this and the request's handler as separate threadpool jobs, and a burst of
    requests each holding a connection between the two can take every pooled connection
    while their handlers wait for a thread (a hundred live viewers connecting did)."""
    token = credentials.credentials if credentials else request.cookies.get(TOKEN_COOKIE)
    user = None
    if token:
        with Session(session.get_bind()) as own:
            user = user_for_token(own, token)
            if user is not None:
                own.expunge(user)
    if user is not None:  # attached without a query: the handler may change and commit it
        user = session.merge(user, load=False)
    if user is None:
        raise HTTPException(401, "sign in first: missing, expired or unknown token",
                            headers={"WWW-Authenticate": "Bearer"})
    if credentials is None:  # a browser's cookie, which a cross-site request also carries
        check_csrf_header(request)
    return user


def presented_token(request: Request,
                    credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
                    ) -> str | None:
    """The token this request authenticates with (bearer header, else the cookie)."""
    return credentials.credentials if credentials else request.cookies.get(TOKEN_COOKIE)


def require(*roles: Role) -> Callable[..., User]:
    """A dependency admitting users with any of ``roles`` (admins always)."""

    def check(user: User = Depends(current_user)) -> User:
        if Role.ADMIN in user.roles or any(r in user.roles for r in roles):
            return user
        raise HTTPException(403, f"{user.username} lacks the role for this: "
                                 f"one of {[r.value for r in roles] or ['admin']}")

    return check


def get_actor(user: User = Depends(current_user)) -> str:
    """Who is acting, for the audit trail."""
    return user.username


def acting(*roles: Role) -> Callable[..., str]:
    """A dependency that checks ``roles`` and yields the username for the audit trail."""
    checker = require(*roles)

    def actor(user: User = Depends(checker)) -> str:
        return user.username

    return actor


#: The one authorization rule for per-case data (a case's outputs, released attributes,
#: failure details, the list of cases): coordinators, and admins. Every route, page and
#: event stream that shows cases asks :func:`may_see_cases` or depends on
#: :data:`case_reader`; aggregates (small-cell suppressed) stay open to every signed-in user.
CASE_READER_ROLES: tuple[Role, ...] = (Role.COORDINATOR,)


def may_see_cases(user: User, experiment: Experiment | None = None) -> bool:
    """Whether ``user`` may see per-case data (of ``experiment``): coordinators and admins,
    and a sandbox study's own developer (synthetic data only, launched by them)."""
    if experiment is not None and experiment.sandbox and experiment.owner == user.username:
        return True
    return Role.ADMIN in user.roles or any(r in user.roles for r in CASE_READER_ROLES)


def case_reader(experiment_id: str, user: User = Depends(current_user),
                session: Session = Depends(get_session)) -> str:
    """A dependency admitting only users who may see the per-case data of the path's
    experiment; yields the username."""
    if may_see_cases(user, session.get(Experiment, experiment_id)):
        return user.username
    raise HTTPException(403, f"{user.username} lacks the role for this: one of "
                             f"{[r.value for r in CASE_READER_ROLES]}")
