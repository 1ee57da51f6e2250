"""The hub's use of the OCI registry: refuse to register a digest the registry does not
serve, and store its approval statements beside the image (cosign's attestation layout,
see :mod:`tributary.protocol.registry`) so they can be checked with standard tools.

With a token service configured the hub mints its own tokens (pull and push on everything)
in-process, and reaches the registry over TLS checked against ``registry_ca_file``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tributary.hub.services.registry_tokens import TokenSigner, full_access, hub_signer
from tributary.hub.settings import HubSettings
from tributary.protocol.registry import RegistryClient, RegistryError, split_repository


class RegistryCheckError(ValueError):
    pass


def token_signer(settings: HubSettings) -> TokenSigner | None:
    """The hub's registry token signer, None when no token service is configured; raises
    :class:`~tributary.hub.services.registry_tokens.TokenError` when misconfigured."""
    return hub_signer(settings.registry_token_key, settings.registry_token_cert,
                      settings.registry_token_issuer, settings.registry_token_service,
                      settings.registry_token_lifetime_seconds)


def hub_token_source(settings: HubSettings) -> Callable[[str], str] | None:
    """Mints the hub's own token for a scope, or None without a token service."""
    signer = token_signer(settings)
    if signer is None:
        return None
    return lambda scope: signer.mint("hub", full_access(scope)).token


def hub_registry_client(registry: str, settings: HubSettings | None = None) -> RegistryClient:
    """A client of ``registry`` acting as the hub (its CA, its in-process tokens)."""
    settings = settings or HubSettings()
    return RegistryClient(registry, settings.insecure_registries,
                          ca_file=settings.registry_ca_file,
                          token_source=hub_token_source(settings))


def verify_manifest(repository: str, digest: str, settings: HubSettings | None = None) -> None:
    """Raise :class:`RegistryCheckError` unless the registry serves exactly ``digest``."""
    registry, name = split_repository(repository)
    try:
        with hub_registry_client(registry, settings) as client:
            served = client.manifest_digest(name, digest)
    except RegistryError as exc:
        raise RegistryCheckError(str(exc)) from exc
    if served is None:
        raise RegistryCheckError(f"{repository}@{digest} is not served by the registry")
    if served != digest:
        raise RegistryCheckError(f"registry serves {served}, not {digest}")


def publish_attestation(repository: str, digest: str, envelope: dict[str, Any],
                        predicate_type: str, settings: HubSettings | None = None) -> str:
    """Attach a signed statement to the image in its registry; returns the manifest digest."""
    registry, name = split_repository(repository)
    with hub_registry_client(registry, settings) as client:
        return client.attach(name, digest, envelope, predicate_type)


def withdraw_attestations(repository: str, digest: str, predicate_type: str,
                          settings: HubSettings | None = None) -> int:
    """Remove the image's statements of one type from its registry; returns how many."""
    registry, name = split_repository(repository)
    with hub_registry_client(registry, settings) as client:
        return client.detach(name, digest, predicate_type)
