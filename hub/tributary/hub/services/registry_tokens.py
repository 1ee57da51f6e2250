"""The registry's bearer tokens, in the format of distribution's token authentication: an
ES256 JWT whose ``x5c`` header carries the signing certificate, which the registry checks
against its ``rootcertbundle``, with ``access`` entries ``{type, name, actions}``.

Tributary adds two fields to an entry that the registry ignores and the registry gateway
(:mod:`tributary.hub.registry_gateway`) enforces: ``digests`` (the only manifests that may be
read, by digest or by their cosign attestation tag) and ``blobs`` (the only blobs). Token
auth alone is per repository; these make it per digest.

No database here: the gateway imports this module too."""

from __future__ import annotations

import base64
import datetime as dt
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ALGORITHM = "ES256"
#: Accepted clock difference between the hub and the registry host (distribution's own).
LEEWAY_S = 60
_SCOPE = re.compile(r"^(?P<type>[a-z]+)(?:\((?P<cls>[a-z0-9]+)\))?:(?P<name>[^\s]+):"
                    r"(?P<actions>[a-z*]*(?:,[a-z*]+)*)$")


class TokenError(ValueError):
    """A token (or a scope) that cannot be trusted or read."""


@dataclass(frozen=True)
class Scope:
    """One requested ``type:name:actions`` scope of the token request."""

    type: str
    name: str
    actions: tuple[str, ...]


def parse_scope(text: str) -> Scope:
    """``repository:dev/algo:pull,push`` (a name never contains ``:``, a host never
    appears in it); raises :class:`TokenError` for anything else."""
    match = _SCOPE.match(text.strip())
    if match is None or len(text) > 512:
        raise TokenError(f"malformed scope {text[:80]!r}")
    actions = tuple(dict.fromkeys(a for a in match["actions"].split(",") if a))
    return Scope(match["type"], match["name"], actions)


@dataclass
class Access:
    """One granted access entry. ``digests``/``blobs`` None: the whole repository."""

    type: str
    name: str
    actions: list[str]
    digests: list[str] | None = None
    blobs: list[str] | None = None

    def claim(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": self.type, "name": self.name,
                                 "actions": list(self.actions)}
        if self.digests is not None:
            entry["digests"] = sorted(set(self.digests))
            entry["blobs"] = sorted(set(self.blobs or []))
        return entry


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: dt.datetime
    access: list[dict[str, Any]] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        """The token service's JSON answer (both names clients read)."""
        return {"token": self.token, "access_token": self.token,
                "expires_in": self.expires_in,
                "issued_at": self.issued_at.isoformat().replace("+00:00", "Z")}


class TokenSigner:
    """Mints tokens with the hub's token signing key and its certificate (P-256)."""

    def __init__(self, key_path: Path, cert_path: Path, issuer: str, service: str,
                 lifetime_s: int = 300) -> None:
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise TokenError(f"cannot load the registry token key {key_path} or "
                             f"certificate {cert_path}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise TokenError(f"{key_path} is not a P-256 private key (ES256 needs one)")
        if chain[0].public_key() != key.public_key():
            raise TokenError(f"{cert_path} is not the certificate of {key_path}")
        self._key = key
        self._x5c = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                     for c in chain]
        self.issuer, self.service, self.lifetime_s = issuer, service, lifetime_s

    def mint(self, subject: str, access: list[Access]) -> IssuedToken:
        now = int(time.time())
        claims = [entry.claim() for entry in access]
        token = jwt.encode({"iss": self.issuer, "sub": subject, "aud": self.service,
                            "iat": now, "nbf": now - 5, "exp": now + self.lifetime_s,
                            "jti": secrets.token_urlsafe(16), "access": claims},
                           self._key, algorithm=ALGORITHM, headers={"x5c": self._x5c})
        return IssuedToken(token, self.lifetime_s, dt.datetime.fromtimestamp(now, dt.UTC),
                           claims)


class TokenVerifier:
    """Checks a token as the registry does: signed by the key of the ``x5c`` leaf
    certificate, that certificate one of ``roots`` or directly issued by one of them and
    currently valid, then issuer, audience and lifetime."""

    def __init__(self, roots_path: Path, issuer: str, service: str) -> None:
        self._roots = x509.load_pem_x509_certificates(roots_path.read_bytes())
        self.issuer, self.service = issuer, service

    def _trusted(self, leaf: x509.Certificate) -> bool:
        now = dt.datetime.now(dt.UTC)
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            return False
        for root in self._roots:
            if root == leaf:
                return True
            try:
                leaf.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
        return False

    def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            x5c = header.get("x5c") or []
            if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
                raise TokenError("token without an x5c certificate")
            leaf = x509.load_der_x509_certificate(base64.b64decode(x5c[0]))
            if not self._trusted(leaf):
                raise TokenError("token signed by an untrusted certificate")
            claims = jwt.decode(token, leaf.public_key(),  # type: ignore[arg-type]
                                algorithms=[ALGORITHM], audience=self.service,
                                issuer=self.issuer, leeway=LEEWAY_S,
                                options={"require": ["exp", "iss", "aud"]})
        except TokenError:
            raise
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise TokenError(f"invalid token: {exc}") from None
        if not isinstance(claims.get("access", []), list):
            raise TokenError("token with malformed access claims")
        return claims


_signers: dict[tuple[object, ...], TokenSigner] = {}


def hub_signer(key_path: Path | None, cert_path: Path | None, issuer: str, service: str,
               lifetime_s: int) -> TokenSigner | None:
    """The hub's token signer for these settings (loaded once), None when not configured."""
    if key_path is None or cert_path is None:
        return None
    cache_key = (str(key_path), str(cert_path), issuer, service, lifetime_s)
    if cache_key not in _signers:
        _signers[cache_key] = TokenSigner(key_path, cert_path, issuer, service, lifetime_s)
    return _signers[cache_key]


def full_access(scope: str) -> list[Access]:
    """What the hub grants itself for one scope: everything asked for."""
    parsed = parse_scope(scope)
    return [Access(parsed.type, parsed.name, list(parsed.actions))]
