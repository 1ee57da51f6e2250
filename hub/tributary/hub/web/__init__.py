"""The dashboard: server-rendered pages over the hub's own REST API."""

from tributary.hub.web import access, catalog, psi, training, vertical
from tributary.hub.web.pages import router
from tributary.hub.web.rendering import SignInRequired

router.include_router(training.router)
router.include_router(catalog.router)
router.include_router(psi.router)
router.include_router(access.router)
router.include_router(vertical.router)

__all__ = ["SignInRequired", "router"]
