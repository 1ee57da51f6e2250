"""Ed25519 keys and DSSE envelopes (the envelope of in-toto attestations, which cosign and
other supply-chain tools read). Everything signed in Tributary is a DSSE envelope:
broker messages, custody records. The DSSE implementation is securesystemslib's."""

from __future__ import annotations

import base64
import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import CryptoSigner, Signature, SSlibKey

from tributary.protocol.canonical import canonical_json, sha256_hex

MESSAGE_PAYLOAD_TYPE = "application/vnd.tributary.message+json"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"


class SignatureError(ValueError):
    """A signature is missing, malformed, made by an untrusted key, or does not verify."""


@dataclass(frozen=True)
class PublicKey:
    key: SSlibKey

    @property
    def keyid(self) -> str:
        return self.key.keyid

    @functools.cached_property
    def _ed25519(self) -> Ed25519PublicKey | None:
        """The parsed key, once: securesystemslib parses it again for each signature,
        which cost as much as a tenth of the hub's ingest of a result."""
        if self.key.keytype != "ed25519" or self.key.scheme != "ed25519":
            return None
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.key.keyval["public"]))

    def verifies(self, signature: Signature, data: bytes) -> bool:
        """Whether ``signature`` (made by this key id) verifies over ``data``."""
        if signature.keyid != self.keyid:
            return False
        parsed = self._ed25519
        try:
            if parsed is None:
                self.key.verify_signature(signature, data)
            else:
                parsed.verify(bytes.fromhex(signature.signature), data)
        except (InvalidSignature, UnverifiedSignatureError, ValueError):
            return False
        return True

    @property
    def pem(self) -> str:
        raw = bytes.fromhex(self.key.keyval["public"])
        return Ed25519PublicKey.from_public_bytes(raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    @classmethod
    def from_pem(cls, pem: str | bytes) -> PublicKey:
        try:
            data = pem.encode() if isinstance(pem, str) else pem
            loaded = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise SignatureError(f"not a PEM public key: {exc}") from None
        if not isinstance(loaded, Ed25519PublicKey):
            raise SignatureError("only Ed25519 public keys are accepted")
        return cls(SSlibKey.from_crypto(loaded))

    @classmethod
    def load(cls, path: Path) -> PublicKey:
        return cls.from_pem(path.read_bytes())


class SigningKey:
    """An Ed25519 private key. Stored as PKCS#8 PEM readable by its owner only."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = PublicKey(SSlibKey.from_crypto(private.public_key()))
        self._signer = CryptoSigner(private, self.public.key)

    @property
    def keyid(self) -> str:
        return self.public.keyid

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise SignatureError(f"{path} is not an Ed25519 private key")
        return cls(private)

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """The key at ``path``, generated there (with ``.pub`` beside it) on first use."""
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        key.save(path)
        return key

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        path.with_suffix(path.suffix + ".pub").write_text(self.public.pem)

    def sign_jwt(self, claims: dict[str, Any]) -> str:
        """A compact JWT (EdDSA) over ``claims``, its header naming this key's id: a
        short-lived credential that proves possession of the key without a shared secret."""
        import jwt  # PyJWT, only needed by the parties that make such credentials

        return jwt.encode(claims, self._private, algorithm="EdDSA",
                          headers={"kid": self.keyid})

    def sign(self, payload: bytes, payload_type: str) -> dict[str, Any]:
        envelope = Envelope(payload=payload, payload_type=payload_type, signatures={})
        envelope.sign(self._signer)
        return envelope.to_dict()


def envelope_signer(envelope: dict[str, Any]) -> str:
    """The key id an envelope claims to be signed by (not yet verified)."""
    try:
        signatures = envelope["signatures"]
        if len(signatures) != 1:
            raise SignatureError("expected exactly one signature")
        return str(signatures[0]["keyid"])
    except (KeyError, TypeError, IndexError):
        raise SignatureError("not a DSSE envelope") from None


def verify(envelope: dict[str, Any], trusted: Iterable[PublicKey], payload_type: str) -> bytes:
    """Return the payload if one trusted key signed it, else raise :class:`SignatureError`."""
    keys = list(trusted)
    if not keys:
        raise SignatureError("no trusted key to verify with")
    try:
        # from_dict rewrites each signature's "sig" in place: it gets copies of them.
        parsed = Envelope.from_dict({**envelope, "signatures": [
            dict(signature) for signature in envelope["signatures"]]})
    except (KeyError, TypeError, ValueError) as exc:
        raise SignatureError(f"not a DSSE envelope: {exc}") from None
    if parsed.payload_type != payload_type:
        raise SignatureError(f"payload type {parsed.payload_type!r}, expected {payload_type!r}")
    # As securesystemslib's Envelope.verify with a threshold of 1 (a signature counts only
    # with a trusted key of its key id), over its pre-authentication encoding, with each
    # key parsed once.
    encoded = parsed.pae()
    for signature in parsed.signatures.values():
        if any(key.verifies(signature, encoded) for key in keys):
            return parsed.payload
    raise SignatureError("signature does not verify with a trusted key")


def statement(subject_name: str, sha256: str, predicate_type: str,
              predicate: dict[str, Any]) -> dict[str, Any]:
    return {"_type": STATEMENT_TYPE,
            "subject": [{"name": subject_name, "digest": {"sha256": sha256}}],
            "predicateType": predicate_type, "predicate": predicate}


def sign_statement(key: SigningKey, stmt: dict[str, Any]) -> dict[str, Any]:
    return key.sign(canonical_json(stmt), INTOTO_PAYLOAD_TYPE)


def verify_statement(envelope: dict[str, Any], trusted: Iterable[PublicKey],
                     predicate_type: str) -> dict[str, Any]:
    payload = verify(envelope, trusted, INTOTO_PAYLOAD_TYPE)
    try:
        stmt = json.loads(payload)
    except ValueError:
        raise SignatureError("statement is not JSON") from None
    if stmt.get("_type") != STATEMENT_TYPE or stmt.get("predicateType") != predicate_type:
        raise SignatureError(f"not an in-toto statement of type {predicate_type}")
    return stmt


def envelope_hash(envelope: dict[str, Any]) -> str:
    return sha256_hex(canonical_json(envelope))


def decode_payload(envelope: dict[str, Any]) -> bytes:
    """The payload without verification, for routing to the right key only."""
    try:
        return base64.b64decode(envelope["payload"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise SignatureError("not a DSSE envelope") from None
