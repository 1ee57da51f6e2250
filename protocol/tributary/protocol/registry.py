"""Signatures stored beside an image in its OCI registry, in the layout cosign uses for
attestations, so anyone can check them with the tools they already have.

For an image ``REPO@sha256:HEX`` the attestations live in the same repository under the
tag ``sha256-HEX.att``: an OCI image manifest whose layers are DSSE envelopes (media type
``application/vnd.dsse.envelope.v1+json``), each annotated with its in-toto
``predicateType``. That is what ``cosign attest`` writes and what
``cosign verify-attestation --key publisher.pub --type PREDICATE_TYPE REPO@sha256:HEX``
reads. Tributary stores two kinds there: the publisher's release statement and the hub's
approval statement. A spoke can then trust a publisher's releases by key alone, with no
digest pinned by hand and nothing but the registry in between.

Only the Registry HTTP API v2 is used (blobs and manifests), which every registry serves;
the OCI 1.1 referrers API is not needed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tributary.protocol.messages import validate_digest, validate_repository

DSSE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    OCI_MANIFEST,
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
#: Attestations larger than this are not signatures; refuse to download them.
MAX_ATTESTATION_BYTES = 1024 * 1024


class RegistryError(RuntimeError):
    """The registry could not be reached or refused a request."""


def base_url(registry: str, insecure: list[str] | None = None, tls: bool = False) -> str:
    """Loopback registries (and those listed as insecure) speak plain HTTP unless ``tls``
    (a CA file was given for them); others HTTPS."""
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    plain = not tls and (host in ("localhost", "[::1]") or host.startswith("127.")
                         or registry in (insecure or []))
    return f"{'http' if plain else 'https'}://{registry}"


def tls_context(ca_file: Path | str | None) -> ssl.SSLContext | bool:
    """Verification for HTTPS: only ``ca_file`` when given (the federation CA), else the
    system's trust store."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise RegistryError(f"cannot read the registry CA file {ca_file}: {exc}") from exc


def _explain(registry: str, exc: Exception) -> str:
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (f"registry {registry}: its TLS certificate is not trusted ({text}); "
                "configure the federation's CA file for the registry")
    return f"registry {registry} unreachable: {text}"


def attestation_tag(digest: str) -> str:
    """cosign's tag for the attestations of ``digest``: ``sha256-HEX.att``."""
    return validate_digest(digest).replace(":", "-") + ".att"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Attestation:
    predicate_type: str
    envelope: dict[str, Any]


class RegistryClient:
    """A minimal OCI distribution client: manifests and blobs of one registry, with the
    registry token flow (``WWW-Authenticate: Bearer``) and optional basic credentials.

    ``ca_file``: the registry speaks TLS with a certificate of this CA (the federation's),
    also on loopback. ``token_source``: mints the bearer token for a scope in-process (the
    hub's own access) instead of asking the challenge's realm."""

    def __init__(self, registry: str, insecure: list[str] | None = None,
                 username: str | None = None, password: str | None = None,
                 timeout: float = 30.0, ca_file: Path | str | None = None,
                 token_source: Callable[[str], str] | None = None) -> None:
        self.registry = registry
        self._auth = (username, password) if username and password else None
        self._verify = tls_context(ca_file)
        self._token_source = token_source
        self._http = httpx.Client(base_url=base_url(registry, insecure, ca_file is not None),
                                  timeout=timeout, verify=self._verify)
        self._tokens: dict[str, str] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, url: str, name: str, push: bool = False,
                 **kwargs: Any) -> httpx.Response:
        scope = f"repository:{name}:{'pull,push' if push else 'pull'}"
        headers = dict(kwargs.pop("headers", {}) or {})
        for _ in range(2):
            if scope in self._tokens:
                headers["Authorization"] = f"Bearer {self._tokens[scope]}"
            elif self._auth:
                headers["Authorization"] = "Basic " + base64.b64encode(
                    f"{self._auth[0]}:{self._auth[1]}".encode()).decode()
            try:
                response = self._http.request(method, url, headers=headers, **kwargs)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise RegistryError(_explain(self.registry, exc)) from exc
            challenge = response.headers.get("WWW-Authenticate", "")
            if response.status_code != 401 or not challenge.lower().startswith("bearer"):
                return response
            self._tokens[scope] = self._token(challenge, scope)
        return response

    def _token(self, challenge: str, scope: str) -> str:
        if self._token_source is not None:
            return self._token_source(scope)
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", None)
        if not realm:
            raise RegistryError(f"registry {self.registry} sent an unusable auth challenge")
        params["scope"] = scope
        try:
            answer = httpx.get(realm, params=params, auth=self._auth, timeout=30,
                               verify=self._verify)
        except httpx.HTTPError as exc:
            raise RegistryError(_explain(realm, exc)) from exc
        if answer.status_code != 200:
            raise RegistryError(f"registry token service refused ({answer.status_code}): "
                                f"{answer.text[:200]}")
        try:
            body = answer.json()
            return str(body.get("token") or body["access_token"])
        except (ValueError, KeyError, AttributeError) as exc:
            raise RegistryError(f"registry token service sent no token: {exc}") from exc

    # -- manifests -----------------------------------------------------------------
    def _manifest(self, method: str, name: str, reference: str) -> httpx.Response | None:
        """The registry's answer for a tag or digest; None when it has no such manifest."""
        response = self._request(method, f"/v2/{name}/manifests/{reference}", name,
                                 headers={"Accept": MANIFEST_TYPES})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise RegistryError(f"registry answered {response.status_code} for "
                                f"{name}:{reference}")
        return response

    def manifest_digest(self, name: str, reference: str) -> str | None:
        """The digest the registry serves for a tag or digest, or None if it has none."""
        response = self._manifest("HEAD", name, reference)
        return None if response is None else response.headers.get("Docker-Content-Digest")

    def get_manifest(self, name: str, reference: str) -> dict[str, Any] | None:
        response = self._manifest("GET", name, reference)
        return None if response is None else dict(response.json())

    def put_manifest(self, name: str, reference: str, manifest: dict[str, Any]) -> str:
        body = json.dumps(manifest, separators=(",", ":")).encode()
        response = self._request("PUT", f"/v2/{name}/manifests/{reference}", name, push=True,
                                 content=body, headers={"Content-Type": manifest["mediaType"]})
        if response.status_code not in (200, 201):
            raise RegistryError(f"registry refused manifest {name}:{reference}: "
                                f"{response.status_code} {response.text[:200]}")
        return _sha256(body)

    # -- blobs ---------------------------------------------------------------------
    def put_blob(self, name: str, data: bytes) -> str:
        digest = _sha256(data)
        head = self._request("HEAD", f"/v2/{name}/blobs/{digest}", name, push=True)
        if head.status_code == 200:
            return digest
        start = self._request("POST", f"/v2/{name}/blobs/uploads/", name, push=True)
        location = start.headers.get("Location")
        if start.status_code != 202 or not location:
            raise RegistryError(f"registry refused an upload to {name}: {start.status_code}")
        upload = httpx.URL(location)  # keep the registry's own query (its upload state)
        upload = upload.copy_merge_params({"digest": digest})
        done = self._request("PUT", str(upload), name, push=True, content=data,
                             headers={"Content-Type": "application/octet-stream"})
        if done.status_code != 201:
            raise RegistryError(f"registry refused blob {digest}: {done.status_code}")
        return digest

    def get_blob(self, name: str, digest: str, limit: int = MAX_ATTESTATION_BYTES) -> bytes:
        response = self._request("GET", f"/v2/{name}/blobs/{digest}", name,
                                 follow_redirects=True)
        if response.status_code != 200:
            raise RegistryError(f"registry answered {response.status_code} for blob {digest}")
        data = response.content
        if len(data) > limit:
            raise RegistryError(f"blob {digest} is {len(data)} bytes, over {limit}")
        if _sha256(data) != digest:
            raise RegistryError(f"blob {digest} does not match its digest")
        return data

    # -- attestations ----------------------------------------------------------------
    def attestations(self, name: str, digest: str) -> list[Attestation]:
        """Every DSSE envelope stored for ``digest`` (not yet verified: check each one's
        signature and subject against keys you trust)."""
        manifest = self.get_manifest(name, attestation_tag(digest))
        found = []
        for layer in (manifest or {}).get("layers", []):
            if layer.get("mediaType") != DSSE_MEDIA_TYPE:
                continue
            try:
                envelope = json.loads(self.get_blob(name, str(layer["digest"])))
            except (KeyError, ValueError) as exc:
                raise RegistryError(f"unreadable attestation layer: {exc}") from exc
            predicate = (layer.get("annotations") or {}).get("predicateType", "")
            found.append(Attestation(predicate, envelope))
        return found

    def attach(self, name: str, digest: str, envelope: dict[str, Any],
               predicate_type: str) -> str:
        """Add ``envelope`` to the attestations of ``digest`` (kept: the ones already there,
        except an identical envelope). Returns the new attestation manifest digest."""
        validate_digest(digest)
        tag = attestation_tag(digest)
        blob = json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()
        layer = {"mediaType": DSSE_MEDIA_TYPE, "size": len(blob),
                 "digest": self.put_blob(name, blob),
                 "annotations": {"predicateType": predicate_type}}
        existing = self.get_manifest(name, tag) or {}
        layers = [entry for entry in existing.get("layers", [])
                  if entry.get("digest") != layer["digest"]] + [layer]
        return self._put_attestations(name, tag, layers)

    def detach(self, name: str, digest: str, predicate_type: str) -> int:
        """Remove every attestation of ``predicate_type`` stored for ``digest`` (an approval
        that was revoked, say), keeping the others. Returns how many were removed."""
        validate_digest(digest)
        tag = attestation_tag(digest)
        existing = self.get_manifest(name, tag)
        if existing is None:
            return 0
        layers = existing.get("layers", [])
        kept = [entry for entry in layers
                if (entry.get("annotations") or {}).get("predicateType") != predicate_type]
        if len(kept) != len(layers):
            self._put_attestations(name, tag, kept)
        return len(layers) - len(kept)

    def _put_attestations(self, name: str, tag: str, layers: list[dict[str, Any]]) -> str:
        config = json.dumps({
            "architecture": "", "os": "", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [entry["digest"] for entry in layers]},
        }, separators=(",", ":")).encode()
        manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "size": len(config),
                       "digest": self.put_blob(name, config)},
            "layers": layers,
        }
        return self.put_manifest(name, tag, manifest)


def split_repository(repository: str) -> tuple[str, str]:
    """``registry/name`` -> (registry, name)."""
    registry, _, name = validate_repository(repository).partition("/")
    return registry, name
