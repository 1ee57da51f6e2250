"""Local infrastructure a federation needs: a Docker engine, an ActiveMQ broker and an OCI
registry, all from Debian packages, on loopback only, started and stopped idempotently."""

from tributary.services.manager import ServiceStatus, down, status, up
from tributary.services.settings import ServiceSettings

__all__ = ["ServiceSettings", "ServiceStatus", "down", "status", "up"]
