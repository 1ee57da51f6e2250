"""Participant credentials: a federation authority vouches that a spoke is a member.

Format: W3C Verifiable Credentials Data Model 2.0 secured with JOSE ("Securing Verifiable
Credentials using JOSE and COSE"): a compact JWS whose header says ``typ: vc+jwt``,
``cty: vc`` and ``alg: Ed25519`` (RFC 9864's fully specified name for EdDSA over Ed25519)
and whose payload is the credential itself, with the JWT claims ``iss``, ``sub``, ``jti``,
``nbf``, ``exp`` and ``iat`` repeated from it (they must agree). Revocation is a W3C
Bitstring Status List, itself such a credential signed by the same authority. Issuers and
subjects are ``did:web`` identifiers; an authority's keys are the ``JsonWebKey`` entries of
its DID document (``did.json``), which the hub is configured with: nothing here reaches the
network. JOSE parsing and signatures are joserfc's; the algorithm is pinned, so ``none``,
HMAC and any other algorithm are refused before a key is ever used.

A membership credential binds the spoke three ways, so nobody else can present it: its
subject is the spoke's did:web, it names the spoke id, and it lists the key ids of the
Ed25519 keys the spoke signs its messages with (``tributary.protocol.signing``)."""

from __future__ import annotations

import base64
import gzip
import re
import zlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tributary.protocol.messages import SPOKE_ID_RE

VC_CONTEXT = "https://www.w3.org/ns/credentials/v2"
#: The vocabulary of Tributary's own terms (``FederationMembershipCredential``, ``spokeId``,
#: ``keyids``). The credential is processed as JSON with a fixed shape, never by JSON-LD
#: expansion, so no context document is ever fetched.
TRIBUTARY_CONTEXT = "https://tributary.dev/ns/credentials/v1"
MEMBERSHIP_TYPE = "FederationMembershipCredential"
STATUS_LIST_TYPE = "BitstringStatusListCredential"
JOSE_TYP = "vc+jwt"
JOSE_CTY = "vc"
#: The one signature algorithm accepted (RFC 9864: EdDSA with Ed25519, fully specified).
ALGORITHM = "Ed25519"
#: Largest credential and status list accepted, before anything is parsed.
MAX_CREDENTIAL_BYTES = 16 * 1024
MAX_STATUS_LIST_BYTES = 256 * 1024
#: The spec's minimum list length (131,072 entries, 16 KiB), for herd privacy; and the most
#: a list may decompress to (so a gzip bomb stops at the limit).
STATUS_LIST_BITS = 131_072
MAX_STATUS_LIST_BITS = 8 * 1024 * 1024
#: The clock skew tolerated on ``nbf``/``exp``, at most.
MAX_LEEWAY_SECONDS = 300
#: Header parameters that would let a token choose its own key or extend processing.
_FORBIDDEN_HEADERS = ("jwk", "jku", "x5u", "x5c", "crit", "b64")

DID_WEB_RE = re.compile(r"^did:web:[a-z0-9][a-z0-9.-]{0,252}(%3A[0-9]{1,5})?"
                        r"(:[A-Za-z0-9._-]{1,64}){0,8}$")
KEYID_RE = re.compile(r"^[0-9a-f]{64}$")


class CredentialError(ValueError):
    """A credential or status list is refused; the message is the reason, for people."""


def _did_web(value: str) -> str:
    if not DID_WEB_RE.fullmatch(value):
        raise ValueError(f"not a did:web identifier: {value[:80]!r}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class MembershipSubject(_Strict):
    """Who the credential is about: the spoke, by DID, id and signing keys."""

    id: str
    type: Literal["FederationMember"] = "FederationMember"
    spokeId: str
    federation: str = Field(min_length=1, max_length=64)
    keyids: list[str] = Field(min_length=1, max_length=16)

    _did = field_validator("id")(_did_web)

    @field_validator("spokeId")
    @classmethod
    def _spoke_id(cls, value: str) -> str:
        if not SPOKE_ID_RE.fullmatch(value):
            raise ValueError("not a spoke id")
        return value

    @field_validator("keyids")
    @classmethod
    def _keyids(cls, value: list[str]) -> list[str]:
        if any(not KEYID_RE.fullmatch(k) for k in value) or len(set(value)) != len(value):
            raise ValueError("key ids must be distinct 64-hex-digit Tributary key ids")
        return value


class StatusEntry(_Strict):
    """Where the credential's revocation bit lives (W3C Bitstring Status List entry)."""

    id: str = Field(max_length=512)
    type: Literal["BitstringStatusListEntry"] = "BitstringStatusListEntry"
    statusPurpose: Literal["revocation"] = "revocation"
    statusListIndex: str = Field(pattern=r"^(0|[1-9][0-9]{0,8})$")
    statusListCredential: str = Field(pattern=r"^https://[^\s#]{1,500}$")

    @property
    def index(self) -> int:
        return int(self.statusListIndex)


class _Secured(_Strict):
    """The VC fields and the JWT claims that must repeat them."""

    context: list[str] = Field(alias="@context", min_length=1, max_length=4)
    id: str = Field(pattern=r"^(urn:uuid:[0-9a-f-]{36}|https://[^\s#]{1,500})$")
    type: list[str] = Field(min_length=2, max_length=4)
    issuer: str
    validFrom: datetime
    validUntil: datetime
    iss: str
    jti: str
    nbf: int
    exp: int
    iat: int

    _issuer = field_validator("issuer")(_did_web)

    def _agree(self, subject_id: str | None, kind: str) -> None:
        if self.context[0] != VC_CONTEXT:
            raise ValueError(f"the first @context must be {VC_CONTEXT}")
        if self.type[0] != "VerifiableCredential" or kind not in self.type:
            raise ValueError(f"type must be VerifiableCredential, {kind}")
        if self.iss != self.issuer or self.jti != self.id:
            raise ValueError("the JWT claims iss/jti disagree with issuer/id")
        if (self.nbf != int(self.validFrom.timestamp())
                or self.exp != int(self.validUntil.timestamp())):
            raise ValueError("the JWT claims nbf/exp disagree with validFrom/validUntil")
        if self.exp <= self.nbf:
            raise ValueError("validUntil must come after validFrom")
        if self.validFrom.tzinfo is None or self.validUntil.tzinfo is None:
            raise ValueError("validFrom and validUntil need a time zone")
        if subject_id is not None and getattr(self, "sub", None) != subject_id:
            raise ValueError("the JWT claim sub disagrees with credentialSubject.id")


class MembershipCredential(_Secured):
    """A federation authority's statement that a spoke is a member (the JWS payload)."""

    sub: str
    credentialSubject: MembershipSubject
    credentialStatus: StatusEntry

    @model_validator(mode="after")
    def _consistent(self) -> MembershipCredential:
        self._agree(self.credentialSubject.id, MEMBERSHIP_TYPE)
        return self


class StatusListSubject(_Strict):
    id: str = Field(pattern=r"^https://[^\s]{1,520}$")
    type: Literal["BitstringStatusList"] = "BitstringStatusList"
    statusPurpose: Literal["revocation"] = "revocation"
    encodedList: str = Field(max_length=MAX_STATUS_LIST_BYTES)


class StatusListCredential(_Secured):
    """The authority's revocation bits for its credentials (the JWS payload)."""

    credentialSubject: StatusListSubject

    @model_validator(mode="after")
    def _consistent(self) -> StatusListCredential:
        self._agree(None, STATUS_LIST_TYPE)
        if not self.id.startswith("https://"):
            raise ValueError("a status list credential's id is its https URL")
        return self


class VerificationMethod(_Strict):
    id: str
    type: Literal["JsonWebKey"] = "JsonWebKey"
    controller: str
    publicKeyJwk: dict[str, str]

    @field_validator("publicKeyJwk")
    @classmethod
    def _public_ed25519(cls, jwk: dict[str, str]) -> dict[str, str]:
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise ValueError("only Ed25519 (OKP) verification keys are accepted")
        if "d" in jwk:
            raise ValueError("a DID document must not hold a private key")
        if set(jwk) - {"kty", "crv", "x", "kid", "use", "alg"}:
            raise ValueError("unexpected JWK members")
        return jwk


class DidDocument(BaseModel):
    """A did:web DID document (``did.json``): the authority's verification keys."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    context: list[str] = Field(alias="@context")
    id: str
    verificationMethod: list[VerificationMethod] = Field(min_length=1, max_length=8)
    assertionMethod: list[str] = Field(min_length=1, max_length=8)

    _did = field_validator("id")(_did_web)

    @model_validator(mode="after")
    def _methods_are_ours(self) -> DidDocument:
        for method in self.verificationMethod:
            if method.controller != self.id or not method.id.startswith(self.id + "#"):
                raise ValueError(f"verification method {method.id} is not controlled by "
                                 f"{self.id}")
        return self

    def assertion_keys(self) -> dict[str, OKPKey]:
        """The keys that may sign credentials (listed under ``assertionMethod``), by id."""
        return {m.id: OKPKey.import_key(dict(m.publicKeyJwk)) for m in self.verificationMethod
                if m.id in self.assertionMethod}


def did_document(did: str, keys: Iterable[OKPKey]) -> DidDocument:
    """The DID document publishing ``keys`` (public parts only) as assertion methods, each
    under the fragment of its JWK thumbprint, so a rotated key gets a new id."""
    methods = [VerificationMethod(id=f"{did}#{key.thumbprint()}", controller=did,
                                  publicKeyJwk={k: str(v) for k, v in
                                                key.as_dict(private=False).items()})
               for key in keys]
    return DidDocument.model_validate({
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/jwk/v1"],
        "id": did, "verificationMethod": [m.model_dump() for m in methods],
        "assertionMethod": [m.id for m in methods]})


def did_web_url(did: str) -> str:
    """Where a did:web document is published (the did:web method's resolution rule)."""
    parts = _did_web(did).removeprefix("did:web:").split(":")
    host = parts[0].replace("%3A", ":")
    path = "/".join(parts[1:]) if len(parts) > 1 else ".well-known"
    return f"https://{host}/{path}/did.json"


# --- signing -------------------------------------------------------------------------

def _timestamp(moment: datetime) -> int:
    return int(moment.timestamp())


def _iso(moment: datetime) -> str:
    return datetime.fromtimestamp(_timestamp(moment), UTC).isoformat().replace("+00:00", "Z")


def _sign(payload: dict[str, Any], key: OKPKey, kid: str) -> str:
    header = {"alg": ALGORITHM, "typ": JOSE_TYP, "cty": JOSE_CTY, "kid": kid}
    return jwt.encode(header, payload, key, algorithms=[ALGORITHM])


def issue_membership(key: OKPKey, kid: str, issuer: str, credential_id: str,
                     subject: MembershipSubject, status: StatusEntry,
                     valid_from: datetime, valid_until: datetime) -> str:
    """A signed membership credential (compact JWS)."""
    payload = {
        "@context": [VC_CONTEXT, TRIBUTARY_CONTEXT], "id": credential_id,
        "type": ["VerifiableCredential", MEMBERSHIP_TYPE], "issuer": issuer,
        "validFrom": _iso(valid_from), "validUntil": _iso(valid_until),
        "credentialSubject": subject.model_dump(), "credentialStatus": status.model_dump(),
        "iss": issuer, "sub": subject.id, "jti": credential_id,
        "nbf": _timestamp(valid_from), "exp": _timestamp(valid_until),
        "iat": _timestamp(datetime.now(UTC))}
    MembershipCredential.model_validate(payload)  # never sign what would be refused
    return _sign(payload, key, kid)


def encode_status_list(bits: bytes) -> str:
    """The spec's ``encodedList``: multibase base64url (prefix ``u``) of the GZIP'd bits."""
    return "u" + base64.urlsafe_b64encode(gzip.compress(bits, mtime=0)).rstrip(b"=").decode()


def decode_status_list(encoded: str) -> bytes:
    """The bits of an ``encodedList``, refusing anything over the size limit."""
    if not encoded.startswith("u"):
        raise CredentialError("status list: encodedList is not multibase base64url")
    try:
        raw = base64.urlsafe_b64decode(encoded[1:] + "=" * (-len(encoded[1:]) % 4))
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        bits = inflater.decompress(raw, MAX_STATUS_LIST_BITS // 8 + 1)
    except (ValueError, zlib.error) as exc:
        raise CredentialError(f"status list: encodedList does not decode: {exc}") from None
    if len(bits) > MAX_STATUS_LIST_BITS // 8 or not inflater.eof:
        raise CredentialError("status list: larger than the limit or truncated")
    if len(bits) * 8 < STATUS_LIST_BITS:
        raise CredentialError(f"status list: fewer than {STATUS_LIST_BITS} entries")
    return bits


def bit(bits: bytes, index: int) -> bool:
    """The spec's bit order: index 0 is the most significant bit of the first byte."""
    if index >= len(bits) * 8:
        raise CredentialError(f"status index {index} is beyond the status list")
    return bool(bits[index // 8] & (0x80 >> (index % 8)))


def issue_status_list(key: OKPKey, kid: str, issuer: str, url: str, bits: bytes,
                      valid_from: datetime, valid_until: datetime) -> str:
    """A signed Bitstring Status List credential whose id is the URL it is published at."""
    payload = {
        "@context": [VC_CONTEXT], "id": url,
        "type": ["VerifiableCredential", STATUS_LIST_TYPE], "issuer": issuer,
        "validFrom": _iso(valid_from), "validUntil": _iso(valid_until),
        "credentialSubject": {"id": f"{url}#list", "type": "BitstringStatusList",
                              "statusPurpose": "revocation",
                              "encodedList": encode_status_list(bits)},
        "iss": issuer, "jti": url, "nbf": _timestamp(valid_from),
        "exp": _timestamp(valid_until), "iat": _timestamp(datetime.now(UTC))}
    StatusListCredential.model_validate(payload)
    return _sign(payload, key, kid)


# --- verification --------------------------------------------------------------------

def _verified_payload(token: str, authorities: Mapping[str, DidDocument], limit: int,
                      what: str) -> tuple[str, dict[str, Any]]:
    """(issuer DID, claims) of a token signed by a trusted authority's assertion key."""
    if not isinstance(token, str) or not token.strip():
        raise CredentialError(f"{what}: empty")
    token = token.strip()
    if len(token) > limit:
        raise CredentialError(f"{what}: larger than {limit} bytes")
    try:
        header = jws.extract_compact(token.encode()).protected
    except (JoseError, ValueError, TypeError) as exc:
        raise CredentialError(f"{what}: not a compact JWS ({exc})") from None
    if header.get("alg") != ALGORITHM:
        raise CredentialError(f"{what}: algorithm {header.get('alg')!r} refused; only "
                              f"{ALGORITHM} is accepted")
    if header.get("typ") != JOSE_TYP:
        raise CredentialError(f"{what}: typ {header.get('typ')!r}, expected {JOSE_TYP!r}")
    forbidden = sorted(set(header) & set(_FORBIDDEN_HEADERS))
    if forbidden:
        raise CredentialError(f"{what}: header parameters {forbidden} are not accepted")
    kid = header.get("kid")
    if not isinstance(kid, str) or "#" not in kid:
        raise CredentialError(f"{what}: the header names no verification method (kid)")
    issuer = kid.split("#", 1)[0]
    document = authorities.get(issuer)
    if document is None:
        raise CredentialError(f"{what}: issuer {issuer[:80]} is not a federation authority "
                              "this hub trusts")
    key = document.assertion_keys().get(kid)
    if key is None:
        raise CredentialError(f"{what}: {kid[:120]} is not an assertion key of {issuer}")
    try:
        decoded = jwt.decode(token, key, algorithms=[ALGORITHM])
    except (JoseError, ValueError, TypeError) as exc:
        raise CredentialError(f"{what}: the signature does not verify with {kid[:120]} "
                              f"({exc.__class__.__name__})") from None
    if not isinstance(decoded.claims, dict):
        raise CredentialError(f"{what}: the payload is not a JSON object")
    if decoded.claims.get("iss") != issuer:
        raise CredentialError(f"{what}: iss does not name the signing authority {issuer}")
    return issuer, decoded.claims


def _check_time(valid_from: int, valid_until: int, now: datetime, leeway: int,
                what: str) -> None:
    leeway = max(0, min(leeway, MAX_LEEWAY_SECONDS))
    moment = _timestamp(now)
    if moment + leeway < valid_from:
        raise CredentialError(f"{what}: not valid before "
                              f"{datetime.fromtimestamp(valid_from, UTC).isoformat()}")
    if moment - leeway >= valid_until:
        raise CredentialError(f"{what}: expired at "
                              f"{datetime.fromtimestamp(valid_until, UTC).isoformat()}")


_Signed = TypeVar("_Signed", MembershipCredential, StatusListCredential)


def _verified(token: str, authorities: Mapping[str, DidDocument], now: datetime, leeway: int,
              model: type[_Signed], max_bytes: int, what: str, kind: str) -> _Signed:
    """``token`` verified against ``authorities``, read as ``model``, issued by the
    authority that signed it and valid at ``now``."""
    issuer, claims = _verified_payload(token, authorities, max_bytes, what)
    try:
        value = model.model_validate(claims)
    except ValidationError as exc:
        raise CredentialError(f"{what}: not a {kind}: {exc.errors()[0]['msg']}") from None
    if value.issuer != issuer:
        raise CredentialError(f"{what}: issuer does not match the signing authority")
    _check_time(value.nbf, value.exp, now, leeway,
                what if model is MembershipCredential else f"{what} {value.id}")
    return value


def verify_membership(token: str, authorities: Mapping[str, DidDocument], now: datetime,
                      leeway: int = 60) -> MembershipCredential:
    """The credential, if a trusted authority signed it and it is valid at ``now``
    (within ``leeway`` seconds of clock skew); else :class:`CredentialError`. Revocation
    and binding are separate checks (:func:`check_status`, :func:`check_binding`)."""
    return _verified(token, authorities, now, leeway, MembershipCredential,
                     MAX_CREDENTIAL_BYTES, "credential", "membership credential")


def verify_status_list(token: str, authorities: Mapping[str, DidDocument], now: datetime,
                       leeway: int = 60) -> StatusListCredential:
    """The status list, if a trusted authority signed it and it is valid at ``now``."""
    return _verified(token, authorities, now, leeway, StatusListCredential,
                     MAX_STATUS_LIST_BYTES, "status list", "bitstring status list credential")


def check_status(credential: MembershipCredential,
                 status_lists: Iterable[StatusListCredential]) -> None:
    """Refuse a revoked credential, or one whose status list is not at hand (fail closed)."""
    entry = credential.credentialStatus
    for status_list in status_lists:
        if status_list.id == entry.statusListCredential:
            if status_list.issuer != credential.issuer:
                raise CredentialError(f"status list {status_list.id} is not the issuer's")
            if bit(decode_status_list(status_list.credentialSubject.encodedList),
                   entry.index):
                raise CredentialError(f"revoked by {credential.issuer} (status list "
                                      f"{status_list.id}, index {entry.index})")
            return
    raise CredentialError(f"its status list {entry.statusListCredential} is not available "
                          "to this hub, so revocation cannot be checked")


def check_binding(credential: MembershipCredential, spoke_id: str,
                  keyids: Iterable[str], federation: str | None = None) -> None:
    """Refuse a credential that is not this spoke's: another spoke id, another federation,
    or a signing key of the spoke's that it does not name."""
    subject = credential.credentialSubject
    if subject.spokeId != spoke_id:
        raise CredentialError(f"the credential is for spoke {subject.spokeId!r}, "
                              f"not {spoke_id!r}")
    if federation is not None and subject.federation != federation:
        raise CredentialError(f"the credential is for federation {subject.federation!r}, "
                              f"not {federation!r}")
    missing = sorted(set(keyids) - set(subject.keyids))
    if missing:
        raise CredentialError(f"the credential does not name the spoke's signing key(s) "
                              f"{', '.join(k[:16] + '…' for k in missing)}")
