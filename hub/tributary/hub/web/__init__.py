"""The dashboard: server-rendered pages over the hub's own REST API."""

from tributary.hub.web.pages import SignInRequired, router

__all__ = ["SignInRequired", "router"]
