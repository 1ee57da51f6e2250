"""FastAPI dependencies: database session, broker client, the acting user."""

from collections.abc import Iterator

from fastapi import Request
from sqlmodel import Session

from tributary.hub.settings import HubSettings
from tributary.protocol.broker import StompClient


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


def get_broker(request: Request) -> StompClient:
    return request.app.state.broker


def get_settings(request: Request) -> HubSettings:
    return request.app.state.settings


def get_actor(request: Request) -> str:
    """Who is acting. Authentication arrives with roles; until then, the client address."""
    return f"api@{request.client.host if request.client else 'unknown'}"
