"""Publisher signatures on algorithm images: an in-toto Statement whose subject is the
image's manifest digest, signed by the algorithm publisher's Ed25519 key in a DSSE
envelope. A spoke that pins publisher keys runs only images one of them signed, so a tag
moved to new content, an unsigned image or one signed by a stranger never runs."""

from __future__ import annotations

import json
from typing import Any

from tributary.protocol.signing import (
    PublicKey,
    SignatureError,
    SigningKey,
    decode_payload,
    sign_statement,
    statement,
    verify_statement,
)

PREDICATE_TYPE = "https://tributary.dev/algorithm-release/v1"


def sign_release(key: SigningKey, repository: str, digest: str, name: str, version: str,
                 publisher: str) -> dict[str, Any]:
    stmt = statement(repository, digest.removeprefix("sha256:"), PREDICATE_TYPE,
                     {"name": name, "version": version, "publisher": publisher})
    return sign_statement(key, stmt)


def verify_release(envelope: dict[str, Any], keys: list[PublicKey],
                   digest: str) -> dict[str, Any]:
    """The release predicate, if a trusted key signed a statement about exactly ``digest``."""
    stmt = verify_statement(envelope, keys, PREDICATE_TYPE)
    subjects = stmt.get("subject") or []
    signed = [s.get("digest", {}).get("sha256") for s in subjects]
    if digest.removeprefix("sha256:") not in signed:
        raise SignatureError(f"the release signature is for {signed}, not for {digest}")
    return stmt["predicate"]


APPROVAL_PREDICATE_TYPE = "https://tributary.dev/approval/v1"


def sign_approval(hub_key: SigningKey, repository: str, digest: str,
                  predicate: dict[str, Any]) -> dict[str, Any]:
    """The hub's statement that this exact digest passed the federation's review rule."""
    stmt = statement(repository, digest.removeprefix("sha256:"), APPROVAL_PREDICATE_TYPE,
                     predicate)
    return sign_statement(hub_key, stmt)


def verify_approval(envelope: dict[str, Any], hub_keys: list[PublicKey],
                    digest: str) -> dict[str, Any]:
    stmt = verify_statement(envelope, hub_keys, APPROVAL_PREDICATE_TYPE)
    signed = [s.get("digest", {}).get("sha256") for s in stmt.get("subject") or []]
    if digest.removeprefix("sha256:") not in signed:
        raise SignatureError(f"the approval is for {signed}, not for {digest}")
    return stmt["predicate"]


SANDBOX_PREDICATE_TYPE = "https://tributary.dev/sandbox/v1"


def sign_sandbox_grant(hub_key: SigningKey, repository: str, digest: str,
                       predicate: dict[str, Any]) -> dict[str, Any]:
    """The hub's leave for one *unreviewed* digest to run on sandbox spokes only (synthetic
    data): a statement of its own type, which :func:`verify_approval` never accepts, so a
    spoke that is not a sandbox refuses it as "not approved"."""
    stmt = statement(repository, digest.removeprefix("sha256:"), SANDBOX_PREDICATE_TYPE,
                     predicate)
    return sign_statement(hub_key, stmt)


def verify_sandbox_grant(envelope: dict[str, Any], hub_keys: list[PublicKey],
                         digest: str) -> dict[str, Any]:
    stmt = verify_statement(envelope, hub_keys, SANDBOX_PREDICATE_TYPE)
    signed = [s.get("digest", {}).get("sha256") for s in stmt.get("subject") or []]
    if digest.removeprefix("sha256:") not in signed:
        raise SignatureError(f"the sandbox grant is for {signed}, not for {digest}")
    return stmt["predicate"]


def is_sandbox_grant(envelope: dict[str, Any] | None) -> bool:
    """Whether an (unverified) statement claims to be a sandbox grant: only to choose which
    check applies; the check itself verifies the signature."""
    if not envelope:
        return False
    try:
        stmt = json.loads(decode_payload(envelope))
    except (SignatureError, ValueError):
        return False
    return isinstance(stmt, dict) and stmt.get("predicateType") == SANDBOX_PREDICATE_TYPE
