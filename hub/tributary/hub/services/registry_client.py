"""The hub's use of the OCI registry: refuse to register a digest the registry does not
serve, and store its approval statements beside the image (cosign's attestation layout,
see :mod:`tributary.protocol.registry`) so they can be checked with standard tools."""

from __future__ import annotations

from typing import Any

from tributary.protocol.registry import RegistryClient, RegistryError, split_repository


class RegistryCheckError(ValueError):
    pass


def verify_manifest(repository: str, digest: str, insecure: list[str] | None = None) -> None:
    """Raise :class:`RegistryCheckError` unless the registry serves exactly ``digest``."""
    registry, name = split_repository(repository)
    try:
        with RegistryClient(registry, insecure) as client:
            served = client.manifest_digest(name, digest)
    except RegistryError as exc:
        raise RegistryCheckError(str(exc)) from exc
    if served is None:
        raise RegistryCheckError(f"{repository}@{digest} is not served by the registry")
    if served != digest:
        raise RegistryCheckError(f"registry serves {served}, not {digest}")


def publish_attestation(repository: str, digest: str, envelope: dict[str, Any],
                        predicate_type: str, insecure: list[str] | None = None) -> str:
    """Attach a signed statement to the image in its registry; returns the manifest digest."""
    registry, name = split_repository(repository)
    with RegistryClient(registry, insecure) as client:
        return client.attach(name, digest, envelope, predicate_type)


def withdraw_attestations(repository: str, digest: str, predicate_type: str,
                          insecure: list[str] | None = None) -> int:
    """Remove the image's statements of one type from its registry; returns how many."""
    registry, name = split_repository(repository)
    with RegistryClient(registry, insecure) as client:
        return client.detach(name, digest, predicate_type)
