"""The registry gateway, an entry point beside the web app: it terminates TLS on the
registry's published port and forwards every request, streamed (uploads included), to the
registry listening on loopback.

Token auth in the registry is per repository. A spoke, though, may only pull the digests
approved for a study that targets it, so the hub puts a ``digests``/``blobs`` restriction
in such a token's access entry (:mod:`tributary.hub.services.registry_tokens`) and the
gateway enforces it: it verifies the bearer token itself and lets a restricted token read
only those manifests (by digest, or by the cosign attestation tag of one) and those blobs.
Anything else reaches the registry, which checks the token as usual.

It also serves the token realm (``/token``) by forwarding to the hub, so a client such as
the Docker engine needs to trust only the registry's address."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tributary.hub.services.registry_tokens import TokenError, TokenVerifier

log = logging.getLogger(__name__)

_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_PATH = re.compile(rf"^/v2/(?P<name>{_NAME})/(?P<kind>manifests|blobs|tags)/(?P<rest>.*)$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ATT_TAG = re.compile(r"^sha256-(?P<hex>[0-9a-f]{64})\.att$")
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailers", "transfer-encoding", "upgrade", "host"}
READ_METHODS = {"GET", "HEAD"}


class GatewayConfig(BaseModel):
    #: The registry on loopback, e.g. ``http://127.0.0.1:5001``.
    upstream: str
    #: Certificates that may sign tokens (the registry's ``rootcertbundle``).
    roots: Path
    issuer: str = "tributary-hub"
    service: str = "tributary-registry"
    #: The realm clients are sent to (the registry's ``auth.token.realm``).
    realm: str
    #: The hub, whose token service ``/token`` is forwarded to; None: not served here.
    hub_url: str | None = None
    #: The CA the hub's certificate is checked against (HTTPS hub).
    hub_ca_file: Path | None = None


def _restriction(claims: dict[str, Any], name: str) -> tuple[set[str], set[str]] | None:
    """The (manifests, blobs) a token limits repository ``name`` to; None: no limit (the
    registry's own check decides)."""
    entries = [e for e in claims.get("access") or []
               if isinstance(e, dict) and e.get("type") == "repository" and e.get("name") == name]
    if not entries or any("digests" not in e for e in entries):
        return None
    digests = {d for e in entries for d in (e.get("digests") or []) if isinstance(d, str)}
    blobs = {d for e in entries for d in (e.get("blobs") or []) if isinstance(d, str)}
    return digests, blobs


def decide(method: str, path: str, claims: dict[str, Any] | None,
           query: Iterable[tuple[str, str]] | None = None) -> str | None:
    """Why this request must not reach the registry, or None to forward it. Only tokens
    whose every entry for the repository carries a ``digests`` restriction are limited;
    a cross-repository blob mount (``?mount=<digest>&from=<repository>``) is limited by the
    restriction on the repository it reads from."""
    if "//" in path or any(part in (".", "..") for part in path.split("/")):
        return "the path is not in canonical form"  # no name the registry reads otherwise
    match = _PATH.match(path)
    if match is None or claims is None:
        return None
    name, kind, rest = match["name"], match["kind"], match["rest"]
    pairs = list(query or [])
    sources = [v for k, v in pairs if k == "from"]
    mounts = [v for k, v in pairs if k == "mount"]
    if len(sources) > 1 or len(mounts) > 1:  # the registry reads the first, we might not
        return "repeated mount parameters"
    if sources:
        limit = _restriction(claims, sources[0])
        if limit is not None and (mounts[0] if mounts else None) not in limit[1]:
            return f"mounting from {sources[0][:80]} is limited to the blobs this token allows"
    limit = _restriction(claims, name)
    if limit is None:
        return None
    digests, blobs = limit
    if method not in READ_METHODS:
        return f"{method} is not allowed with a digest-restricted token"
    if kind == "manifests":
        attestation = _ATT_TAG.match(rest)
        if rest in digests or (attestation and f"sha256:{attestation['hex']}" in digests):
            return None
        return f"{name}:{rest} is not among the digests this token allows"
    if kind == "blobs" and _DIGEST.match(rest) and rest in blobs:
        return None
    return f"{name}/{kind}/{rest[:80]} is not allowed with a digest-restricted token"


def _registry_error(status: int, code: str, message: str,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"errors": [{"code": code, "message": message}]}, status_code=status,
                        headers=headers)


def create_gateway(config: GatewayConfig) -> Starlette:
    verifier = TokenVerifier(config.roots, config.issuer, config.service)
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        timeout = httpx.Timeout(300.0, connect=10.0)
        state["registry"] = httpx.AsyncClient(base_url=config.upstream, timeout=timeout)
        verify: Any = True
        if config.hub_ca_file is not None:
            import ssl

            verify = ssl.create_default_context(cafile=str(config.hub_ca_file))
        state["hub"] = httpx.AsyncClient(timeout=30.0, verify=verify)
        yield
        for client in state.values():
            await client.aclose()

    def challenge() -> dict[str, str]:
        return {"WWW-Authenticate": f'Bearer realm="{config.realm}",'
                                    f'service="{config.service}"'}

    async def forward(client: httpx.AsyncClient, url: str, request: Request,
                      extra: dict[str, str] | None = None) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers.update(extra or {})
        body = request.stream() if request.method in ("POST", "PUT", "PATCH") else None
        if request.url.query:  # verbatim: repeated keys (several scopes) must all arrive
            url = f"{url}?{request.url.query}"
        upstream = client.build_request(request.method, url, headers=headers, content=body)
        try:
            answer = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            log.warning("upstream %s unreachable: %s", url, exc)
            return _registry_error(502, "UNAVAILABLE", "the registry is unreachable")
        out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
        return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code,
                                 headers=out, background=BackgroundTask(answer.aclose))

    async def token(request: Request) -> Response:
        if config.hub_url is None:
            return _registry_error(404, "NOT_FOUND", "no token service here")
        client_host = request.client.host if request.client else ""
        return await forward(state["hub"], config.hub_url.rstrip("/") + "/api/registry/token",
                             request, {"X-Forwarded-For": client_host})

    async def registry(request: Request) -> Response:
        path = request.url.path
        claims = None
        authorization = request.headers.get("authorization", "")
        if authorization[:7].lower() == "bearer ":
            try:
                claims = verifier.verify(authorization[7:].strip())
            except TokenError as exc:
                return _registry_error(401, "UNAUTHORIZED", str(exc), challenge())
        reason = decide(request.method, path, claims, request.query_params.multi_items())
        if reason is not None:
            log.info("refused %s %s: %s", request.method, path, reason)
            return _registry_error(403, "DENIED", reason)
        return await forward(state["registry"], path, request)

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/token", token, methods=["GET"]),
                             Route("/{path:path}", registry, methods=methods)],
                     lifespan=lifespan)


def serve(config: GatewayConfig, host: str, port: int, cert_file: Path,
          key_file: Path) -> None:
    """Run the gateway with TLS until SIGTERM or Ctrl-C."""
    import uvicorn

    uvicorn.run(create_gateway(config), host=host, port=port, ssl_certfile=str(cert_file),
                ssl_keyfile=str(key_file), log_level="warning", proxy_headers=False)
