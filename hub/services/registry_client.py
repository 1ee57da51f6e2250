"""Ask an OCI registry whether it serves a manifest digest (distribution spec HEAD
/v2/<name>/manifests/<digest>), so an algorithm that cannot be pulled is never registered."""

from __future__ import annotations

import httpx

MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


class RegistryCheckError(ValueError):
    pass


def _base_url(registry: str, insecure: list[str]) -> str:
    host = registry.split(":")[0]
    plain = host in ("localhost", "::1") or host.startswith("127.") or registry in insecure
    return f"{'http' if plain else 'https'}://{registry}"


def verify_manifest(repository: str, digest: str, insecure: list[str] | None = None,
                    timeout: float = 10.0) -> None:
    """Raise :class:`RegistryCheckError` unless the registry serves exactly ``digest``."""
    registry, _, name = repository.partition("/")
    url = f"{_base_url(registry, insecure or [])}/v2/{name}/manifests/{digest}"
    try:
        response = httpx.head(url, headers={"Accept": MANIFEST_TYPES}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise RegistryCheckError(f"registry {registry} unreachable: {exc}") from exc
    if response.status_code == 404:
        raise RegistryCheckError(f"{repository}@{digest} is not served by the registry")
    if response.status_code != 200:
        raise RegistryCheckError(
            f"registry answered {response.status_code} for {repository}@{digest}"
        )
    served = response.headers.get("Docker-Content-Digest")
    if served and served != digest:
        raise RegistryCheckError(f"registry serves {served}, not {digest}")
