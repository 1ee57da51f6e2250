"""The cryptography of a PSI at a spoke, all from maintained libraries: ECDH-based PSI from
OpenMined's ``openmined-psi`` (``private_set_intersection.python``), and X25519, HKDF,
AES-GCM and HMAC from ``cryptography``. Nothing here is a home-made primitive; this module
only fixes how they are combined and what each is bound to.

- Pair keys: leader and partner each make an ephemeral X25519 key per PSI and sign its
  public half with their enrolled Ed25519 key (the ``hello``); HKDF over the shared secret,
  bound to the PSI and both spoke ids, gives the AES-GCM key for everything else they
  relay. The hub relays both hellos but cannot compute the key.
- Linking pseudonyms: HMAC-SHA256 of the agreed identifier under a PSI-scoped key the
  leader derives from a secret of its own and hands to each partner under its pair key:
  the same at every spoke for the same patient, different for every PSI, and not
  computable by the hub.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import private_set_intersection.python as openmined
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tributary.protocol.cohorts.psi import HELLO_PAYLOAD_TYPE, PsiHello
from tributary.protocol.signing import PublicKey, SignatureError, SigningKey, verify

#: False-positive rate of the compressed (GCS) setup used when only a size is wanted.
CARDINALITY_FPR = 1e-9


class PsiCryptoError(ValueError):
    """A relayed payload that does not verify, decrypt or parse."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise PsiCryptoError("payload is not base64") from None


# -- key agreement ----------------------------------------------------------------------------
def new_exchange_key() -> bytes:
    """A fresh X25519 private key (raw bytes, kept in the spoke's journal)."""
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                     NoEncryption())


def hello(signing_key: SigningKey, exchange_key: bytes, psi_id: str, me: str,
          peer: str) -> str:
    """The ``hello`` payload: my ephemeral public key, signed by my enrolled key."""
    public = X25519PrivateKey.from_private_bytes(exchange_key).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)
    statement = PsiHello(psi_id=psi_id, from_spoke=me, to_spoke=peer, x25519_public=b64(public))
    envelope = signing_key.sign(statement.model_dump_json().encode(), HELLO_PAYLOAD_TYPE)
    return b64(json.dumps(envelope).encode())


def open_hello(payload: str, peer_key_pem: str, psi_id: str, peer: str, me: str) -> bytes:
    """The peer's X25519 public key from its ``hello``, once its enrolled key's signature
    and the PSI and both names it is bound to check."""
    try:
        envelope = json.loads(unb64(payload))
        body = verify(envelope, [PublicKey.from_pem(peer_key_pem)], HELLO_PAYLOAD_TYPE)
        statement = PsiHello.model_validate_json(body)
    except (SignatureError, ValueError, TypeError) as exc:
        raise PsiCryptoError(f"hello from {peer} does not verify: {exc}"[:500]) from None
    if (statement.psi_id, statement.from_spoke, statement.to_spoke) != (psi_id, peer, me):
        raise PsiCryptoError(f"hello from {peer} is bound to another PSI or spoke")
    public = unb64(statement.x25519_public)
    if len(public) != 32:
        raise PsiCryptoError("hello carries no X25519 public key")
    return public


def pair_key(exchange_key: bytes, peer_public: bytes, psi_id: str, leader: str,
             partner: str) -> bytes:
    """The AES-GCM key leader and partner share for this PSI."""
    shared = X25519PrivateKey.from_private_bytes(exchange_key).exchange(
        X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(hashes.SHA256(), 32, salt=None,
                info=f"tributary-psi-pair|{psi_id}|{leader}|{partner}".encode()).derive(shared)


def _aad(psi_id: str, sender: str, receiver: str, step: str) -> bytes:
    return f"{psi_id}|{sender}|{receiver}|{step}".encode()


def encrypt(key: bytes, data: bytes, psi_id: str, sender: str, receiver: str,
            step: str) -> str:
    nonce = os.urandom(12)
    return b64(nonce + AESGCM(key).encrypt(nonce, data, _aad(psi_id, sender, receiver, step)))


def decrypt(key: bytes, payload: str, psi_id: str, sender: str, receiver: str,
            step: str) -> bytes:
    raw = unb64(payload)
    try:
        return AESGCM(key).decrypt(raw[:12], raw[12:], _aad(psi_id, sender, receiver, step))
    except Exception:  # InvalidTag, or too short to hold a nonce and a tag
        raise PsiCryptoError(f"{step} from {sender} does not decrypt under the pair key"
                             ) from None


# -- linking pseudonyms -----------------------------------------------------------------------
def link_key(secret: bytes, psi_id: str) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None,
                info=f"tributary-psi-link|{psi_id}".encode()).derive(secret)


def pseudonym(key: bytes, identifier: str) -> str:
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(identifier.encode())
    return "lnk-" + mac.finalize().hex()[:32]


# -- the PSI itself (openmined-psi) -----------------------------------------------------------
def client_request(items: list[str], reveal: bool) -> tuple[bytes, bytes]:
    """(the client's private key, its blinded request)."""
    client = openmined.client.CreateWithNewKey(reveal)
    return client.GetPrivateKeyBytes(), client.CreateRequest(items).SerializeToString()


def server_answer(items: list[str], request: bytes, reveal: bool) -> bytes:
    """The server's setup (its own blinded items) and its response to the request, as one
    JSON document; a fresh server key per request."""
    parsed = openmined.Request()
    try:
        parsed.ParseFromString(request)
    except Exception:
        raise PsiCryptoError("the PSI request does not parse") from None
    server = openmined.server.CreateWithNewKey(reveal)
    structure = openmined.DataStructure.RAW if reveal else openmined.DataStructure.GCS
    setup = server.CreateSetupMessage(CARDINALITY_FPR, max(len(parsed.encrypted_elements), 1),
                                      items, structure)
    try:
        response = server.ProcessRequest(parsed)
    except Exception as exc:
        raise PsiCryptoError(f"the PSI request was refused: {exc}"[:500]) from None
    answer: dict[str, Any] = {"setup": b64(setup.SerializeToString()),
                              "response": b64(response.SerializeToString())}
    return json.dumps(answer).encode()


def client_result(key: bytes, reveal: bool, answer: bytes) -> list[int] | int:
    """Indices (into the client's items) of the intersection, or only its size."""
    try:
        parts = json.loads(answer)
        setup, response = openmined.ServerSetup(), openmined.Response()
        setup.ParseFromString(unb64(parts["setup"]))
        response.ParseFromString(unb64(parts["response"]))
        client = openmined.client.CreateFromKey(key, reveal)
        if reveal:
            return sorted(int(i) for i in client.GetIntersection(setup, response))
        return int(client.GetIntersectionSize(setup, response))
    except PsiCryptoError:
        raise
    except Exception as exc:
        raise PsiCryptoError(f"the PSI answer does not parse: {exc}"[:500]) from None
