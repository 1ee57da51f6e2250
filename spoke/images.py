"""Getting an algorithm image: by manifest digest only, from an allowed registry, and
checked against the digest again after the pull."""

from __future__ import annotations

import docker
import docker.errors

from tributary.protocol.messages import AlgorithmRef, FailureReason


class ImageRefused(RuntimeError):
    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def ensure_image(client: docker.DockerClient, ref: AlgorithmRef,
                 allowed_registries: list[str]) -> str:
    """Pull ``ref`` if needed and return the image id; raise :class:`ImageRefused`."""
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
    served = image.attrs.get("RepoDigests") or []
    if ref.reference not in served:
        raise ImageRefused(FailureReason.IMAGE_DIGEST_MISMATCH,
                           f"pulled image digests {served} do not include {ref.reference}")
    return image.id
