"""Getting an algorithm image: by manifest digest only, from an allowed registry, and
checked against the digest again after the pull."""

from __future__ import annotations

from collections.abc import Callable

import docker
import docker.errors

from tributary.protocol.messages import AlgorithmRef, FailureReason
from tributary.protocol.release import verify_approval, verify_release
from tributary.protocol.signing import PublicKey, SignatureError


class ImageRefused(RuntimeError):
    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def ensure_image(client: docker.DockerClient, ref: AlgorithmRef,
                 allowed_registries: list[str],
                 on_pull: Callable[[str], None] | None = None) -> str:
    """Pull ``ref`` if needed and return the image id; raise :class:`ImageRefused`.
    ``on_pull`` is told the pulled image's id (before the digest check) for the audit log."""
    registry = ref.repository.split("/", 1)[0]
    if allowed_registries and registry not in allowed_registries:
        raise ImageRefused(FailureReason.IMAGE_UNAVAILABLE,
                           f"registry {registry} is not allowed by this spoke's policy")
    try:
        image = client.images.get(ref.reference)
    except docker.errors.ImageNotFound:
        try:
            image = client.images.pull(ref.repository, tag=ref.digest)
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


def check_release(ref: AlgorithmRef, publishers: list[PublicKey]) -> str | None:
    """Require a release signature by a trusted publisher for exactly this digest, when the
    site pins publisher keys. Checked before anything is pulled; returns the publisher."""
    if not publishers:
        return None
    if ref.release_signature is None:
        raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED,
                           "unsigned image: no publisher release signature")
    try:
        predicate = verify_release(ref.release_signature, publishers, ref.digest)
    except SignatureError as exc:
        raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED, f"release signature: {exc}") from None
    return str(predicate.get("publisher"))


def check_approval(ref: AlgorithmRef, hub_keys: list[PublicKey]) -> None:
    """Require the hub's signed approval of exactly this digest."""
    if ref.approval is None:
        raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED, "not approved: no approval statement")
    try:
        verify_approval(ref.approval, hub_keys, ref.digest)
    except SignatureError as exc:
        raise ImageRefused(FailureReason.IMAGE_NOT_TRUSTED, f"approval: {exc}") from None
