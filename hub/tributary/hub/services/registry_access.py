"""Who may do what in the registry: the policy behind the hub's registry token service.

- a hub user with the developer role (or admin): pull and push on repositories under
  ``<username>/``;
- any enabled hub user: pull of approved, not revoked digests, nothing else of a repository;
- a spoke (username: its id, password: an assertion signed with an active enrolled key,
  :mod:`tributary.protocol.registry_auth`): pull only, only the digests of approved, not
  revoked versions used by a launched (or completed) experiment that targets it; a draft
  grants nothing until it is launched, a cancelled study nothing any more; a revoked
  spoke, or one without an active key, is refused;
- the hub itself mints its own tokens in-process (:mod:`.registry_client`), never here.

A digest-restricted grant lists the manifests and blobs it covers (read from the registry
with the hub's own access when the token is minted); the registry gateway enforces them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import jwt
from sqlmodel import Session, select

from tributary.hub.models import (
    Algorithm,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Role,
    Spoke,
    SpokeKey,
)
from tributary.hub.services import audit, users
from tributary.hub.services.registry_client import hub_registry_client
from tributary.hub.services.registry_tokens import Access, IssuedToken, Scope, TokenSigner
from tributary.hub.settings import HubSettings
from tributary.protocol.registry import RegistryError, attestation_tag, split_repository
from tributary.protocol.registry_auth import MAX_ASSERTION_LIFETIME_S

log = logging.getLogger(__name__)
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}


@dataclass(frozen=True)
class Principal:
    """Who asks for a token."""

    kind: str  # "user" | "spoke"
    name: str
    roles: tuple[str, ...] = ()


class AccessRefused(PermissionError):
    """Credentials missing or not accepted (the token service answers 401)."""


def _looks_like_jwt(text: str) -> bool:
    return text.count(".") == 2 and len(text) < 4096


def authenticate_spoke(session: Session, spoke_id: str, assertion: str,
                       service: str) -> Principal:
    """The spoke whose active enrolled key signed ``assertion`` for ``service``."""
    spoke = session.get(Spoke, spoke_id)
    if spoke is None:
        raise AccessRefused(f"unknown spoke {spoke_id!r}")
    if spoke.revoked_at is not None:
        raise AccessRefused(f"spoke {spoke_id} is revoked")
    try:
        keyid = jwt.get_unverified_header(assertion).get("kid")
    except jwt.PyJWTError as exc:
        raise AccessRefused(f"unreadable assertion: {exc}") from None
    row = session.get(SpokeKey, keyid) if isinstance(keyid, str) else None
    if row is None or row.spoke_id != spoke_id or row.revoked_at is not None:
        raise AccessRefused(f"assertion not signed by an active key of spoke {spoke_id}")
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        claims = jwt.decode(assertion, load_pem_public_key(row.public_key_pem.encode()),
                            algorithms=["EdDSA"], audience=service, leeway=30,
                            options={"require": ["exp", "iat", "sub", "aud"]})
    except jwt.PyJWTError as exc:
        raise AccessRefused(f"assertion refused: {exc}") from None
    if claims.get("sub") != spoke_id:
        raise AccessRefused("assertion made for another spoke")
    if int(claims["exp"]) - int(claims["iat"]) > MAX_ASSERTION_LIFETIME_S:
        raise AccessRefused("assertion lives too long")
    return Principal("spoke", spoke_id)


def authenticate(session: Session, username: str, password: str,
                 service: str) -> Principal:
    """A spoke (its id and a signed assertion) or a hub user (username and password)."""
    if _looks_like_jwt(password) and session.get(Spoke, username) is not None:
        return authenticate_spoke(session, username, password, service)
    user = users.authenticate(session, username, password)
    if user is None:
        raise AccessRefused("wrong username or password")
    return Principal("user", user.username, tuple(user.roles))


def approved_digests(session: Session, name: str,
                     spoke_id: str | None = None) -> dict[str, str]:
    """Approved, not revoked digests of repository ``name``, each with the registry that
    serves it (for ``spoke_id``: only those of launched or completed experiments that
    target it)."""
    query = select(Algorithm).where(Algorithm.approved_at != None,  # noqa: E711
                                    Algorithm.revoked_at == None)  # noqa: E711
    if spoke_id is not None:
        query = (query.join(Experiment, Experiment.algorithm_id == Algorithm.id)
                 .join(ExperimentTarget, ExperimentTarget.experiment_id == Experiment.id)
                 .where(ExperimentTarget.spoke_id == spoke_id,
                        Experiment.state.in_(  # type: ignore[attr-defined]
                            [ExperimentState.LAUNCHED, ExperimentState.COMPLETED])))
    digests: dict[str, str] = {}
    for algorithm in session.exec(query):
        try:
            registry, repository_name = split_repository(algorithm.repository)
        except ValueError:
            continue
        if repository_name == name:
            digests[algorithm.digest] = registry
    return digests


def _owns(principal: Principal, name: str) -> bool:
    may_push = Role.DEVELOPER.value in principal.roles or Role.ADMIN.value in principal.roles
    return principal.kind == "user" and may_push and name.startswith(principal.name + "/")


def contents(settings: HubSettings, registry: str, name: str,
             digests: Iterable[str]) -> tuple[set[str], set[str]]:
    """Manifests (with an index's children) and blobs (configs, layers, and those of the
    attestation manifests) that pulling ``digests`` of ``name`` needs."""
    manifests: set[str] = set()
    blobs: set[str] = set()
    with hub_registry_client(registry, settings) as client:
        def walk(reference: str, depth: int = 0) -> None:
            manifest = client.get_manifest(name, reference)
            if manifest is None:
                return
            if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
                for child in manifest.get("manifests", [])[:64]:
                    if depth < 1 and isinstance(child.get("digest"), str):
                        manifests.add(child["digest"])
                        walk(child["digest"], depth + 1)
                return
            for item in [manifest.get("config") or {}, *manifest.get("layers", [])]:
                if isinstance(item, dict) and isinstance(item.get("digest"), str):
                    blobs.add(item["digest"])

        for digest in digests:
            manifests.add(digest)
            walk(digest)
            walk(attestation_tag(digest))
    return manifests, blobs


def grant(session: Session, settings: HubSettings, principal: Principal,
          scopes: list[Scope]) -> tuple[list[Access], list[str]]:
    """The access granted for ``scopes`` and the scopes (or actions) refused."""
    granted: list[Access] = []
    refused: list[str] = []
    for scope in scopes:
        wanted = set(scope.actions)
        allowed: set[str] = set()
        if scope.type == "repository" and _owns(principal, scope.name):
            allowed = wanted & {"pull", "push"}
            if allowed:
                granted.append(Access("repository", scope.name, sorted(allowed)))
        elif scope.type == "repository" and "pull" in wanted:
            spoke = principal.name if principal.kind == "spoke" else None
            by_registry: dict[str, list[str]] = {}
            for digest, registry in approved_digests(session, scope.name, spoke).items():
                by_registry.setdefault(registry, []).append(digest)
            manifests: set[str] = set()
            blobs: set[str] = set()
            for registry, digests in by_registry.items():
                try:
                    found = contents(settings, registry, scope.name, digests)
                except RegistryError as exc:
                    log.warning("registry read for a token failed: %s", exc)
                    continue
                manifests |= found[0]
                blobs |= found[1]
            if manifests:
                allowed = {"pull"}
                granted.append(Access("repository", scope.name, ["pull"], sorted(manifests),
                                      sorted(blobs)))
        if wanted - allowed:
            refused.append(f"{scope.type}:{scope.name}:{','.join(sorted(wanted - allowed))}")
    return granted, refused


def issue(session: Session, settings: HubSettings, signer: TokenSigner,
          principal: Principal, scopes: list[Scope]) -> IssuedToken:
    """A token with what ``principal`` may have of ``scopes``; refusals are audited."""
    granted, refused = grant(session, settings, principal, scopes)
    if refused:
        audit.record(session, f"{principal.kind}:{principal.name}", "registry.access_refused",
                     principal.name, refused=refused)
        session.commit()
    return signer.mint(f"{principal.kind}:{principal.name}", granted)


def record_refusal(session: Session, username: str, reason: str) -> None:
    """A token request whose credentials were refused."""
    audit.record(session, username or "anonymous", "registry.token_refused",
                 username or "anonymous", reason=reason)
    session.commit()
