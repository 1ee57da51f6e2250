"""Getting an algorithm image: by manifest digest only, from an allowed registry, and
checked against the digest again after the pull."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from tributary.protocol.messages import AlgorithmRef, FailureReason
from tributary.protocol.registry import RegistryClient, RegistryError, split_repository
from tributary.protocol.registry_auth import spoke_assertion
from tributary.protocol.release import PREDICATE_TYPE as RELEASE_PREDICATE_TYPE
from tributary.protocol.release import verify_approval, verify_release
from tributary.protocol.signing import PublicKey, SignatureError, SigningKey


class ImageRefused(RuntimeError):
    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RegistryAccess:
    """How the spoke authenticates to its registry: as itself, with a fresh assertion
    signed by its enrolled key as the password (``token_service`` set), over TLS checked
    against ``ca_file`` (the Docker engine reads the same CA from its certs.d)."""

    spoke_id: str = ""
    key: SigningKey | None = None
    token_service: str | None = None
    ca_file: Path | None = None

    def credentials(self) -> tuple[str, str] | None:
        if self.key is None or not self.token_service:
            return None
        return self.spoke_id, spoke_assertion(self.key, self.spoke_id, self.token_service)

    def auth_config(self) -> dict[str, str] | None:
        """Docker's ``auth_config`` for a pull, or None (anonymous)."""
        creds = self.credentials()
        return None if creds is None else {"username": creds[0], "password": creds[1]}

    def client(self, registry: str) -> RegistryClient:
        creds = self.credentials()
        return RegistryClient(registry, username=creds[0] if creds else None,
                              password=creds[1] if creds else None, ca_file=self.ca_file)


ANONYMOUS = RegistryAccess()


def ensure_image(client: docker.DockerClient, ref: AlgorithmRef,
                 allowed_registries: list[str],
                 on_pull: Callable[[str], None] | None = None,
                 access: RegistryAccess = ANONYMOUS) -> str:
    """Pull ``ref`` if needed and return the image id; raise :class:`ImageRefused`.
    ``on_pull`` is told the pulled image's id (before the digest check) for the audit log."""
    _allowed(ref, allowed_registries)
    try:
        image = client.images.get(ref.reference)
    except docker.errors.ImageNotFound:
        try:
            image = client.images.pull(ref.repository, tag=ref.digest,
                                       auth_config=access.auth_config())
        except docker.errors.APIError as exc:
            raise ImageRefused(
                FailureReason.IMAGE_UNAVAILABLE,
                f"registry does not serve {ref.reference}: {exc.explanation or exc}",
            ) from None
        if on_pull is not None:
            on_pull(image.id)
    served = image.attrs.get("RepoDigests") or []
    if ref.reference not in served:
        raise ImageRefused(FailureReason.IMAGE_DIGEST_MISMATCH,
                           f"pulled image digests {served} do not include {ref.reference}")
    return image.id


def verify_served(ref: AlgorithmRef, allowed_registries: list[str],
                  access: RegistryAccess = ANONYMOUS) -> str:
    """For executors whose compute nodes pull the image themselves (Slurm): the registry
    must serve exactly ``ref.digest`` (the nodes then pull by that digest, which Podman
    checks against the manifest). Returns the digest; raises :class:`ImageRefused`."""
    _allowed(ref, allowed_registries)
    registry, name = split_repository(ref.repository)
    try:
        with access.client(registry) as client:
            served = client.manifest_digest(name, ref.digest)
    except RegistryError as exc:
        raise ImageRefused(FailureReason.IMAGE_UNAVAILABLE,
                           f"registry does not serve {ref.reference}: {exc}") from None
    if served is None:
        raise ImageRefused(FailureReason.IMAGE_UNAVAILABLE,
                           f"registry does not serve {ref.reference}")
    if served != ref.digest:
        raise ImageRefused(FailureReason.IMAGE_DIGEST_MISMATCH,
                           f"registry serves {served} for {ref.reference}")
    return served


def _allowed(ref: AlgorithmRef, allowed_registries: list[str]) -> None:
    registry = ref.repository.split("/", 1)[0]
    if allowed_registries and registry not in allowed_registries:
        raise ImageRefused(FailureReason.IMAGE_UNAVAILABLE,
                           f"registry {registry} is not allowed by this spoke's policy")


def registry_releases(ref: AlgorithmRef,
                      access: RegistryAccess = ANONYMOUS) -> list[dict[str, Any]]:
    """Release statements stored beside the image in its registry (cosign's attestation
    layout). Unverified: the caller checks them against the keys it trusts."""
    registry, name = split_repository(ref.repository)
    try:
        with access.client(registry) as client:
            found = client.attestations(name, ref.digest)
    except RegistryError as exc:
        raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                           f"could not read the image's signatures: {exc}") from None
    return [a.envelope for a in found if a.predicate_type == RELEASE_PREDICATE_TYPE]


def check_release(ref: AlgorithmRef, publishers: list[PublicKey],
                  allowed_registries: list[str] | None = None,
                  from_registry: bool = True,
                  access: RegistryAccess = ANONYMOUS) -> str | None:
    """Require a release signature by a trusted publisher for exactly this digest, when the
    site pins publisher keys. The signature comes with the experiment or, failing that,
    from the registry where the publisher pushed it. Checked before anything is pulled;
    returns the publisher."""
    if not publishers:
        return None
    candidates = [ref.release_signature] if ref.release_signature is not None else []
    if not candidates and from_registry:
        _allowed(ref, allowed_registries or [])
        candidates = registry_releases(ref, access)
    if not candidates:
        raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                           "unsigned image: no publisher release signature")
    problems = []
    for envelope in candidates:
        try:
            return str(verify_release(envelope, publishers, ref.digest).get("publisher"))
        except SignatureError as exc:
            problems.append(str(exc))
    raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                       f"release signature: {'; '.join(problems)}")


def check_approval(ref: AlgorithmRef, hub_keys: list[PublicKey]) -> None:
    """Require the hub's signed approval of exactly this digest."""
    if ref.approval is None:
        raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED, "not approved: no approval statement")
    try:
        verify_approval(ref.approval, hub_keys, ref.digest)
    except SignatureError as exc:
        raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED, f"approval: {exc}") from None
