"""SecAgg+ (Bell et al., CCS 2020): the hub learns the sum of the spokes' quantised updates
and nothing about any single one, and the sum survives the dropout of spokes.

Stages (each a pair of message models; the orchestration carries them as signed broker
messages, the masked vectors themselves through the object store):

0. **setup** :class:`RoundConfig` (hub): participants, threshold t, the neighbour graph (a
   random Harary graph of degree k, or the complete graph), modulus 2^bits, vector length.
1. **keys** :class:`KeyAdvertisement` (client -> hub): two fresh X25519 public keys (one
   for pairwise masks, one for encrypting shares) and a commitment to the self-mask seed.
   The hub forwards each client its neighbours' advertisements (:class:`NeighbourKeys`).
2. **shares** :class:`ShareBundle` (client -> hub): Shamir shares (threshold t, among the
   client and its neighbours) of its mask private key and of its self-mask seed, one AEAD
   ciphertext per neighbour (key: HKDF of the X25519 share-key agreement; associated data:
   round, sender, receiver). The hub cannot read them; it routes them
   (:class:`ShareDelivery`).
3. **masked input** :class:`MaskedInput` (client -> hub): the digest of
   ``y = x + PRG(b) + sum_v +/-PRG(s_uv) mod 2^bits`` (the vector travels separately);
   PRG is the ChaCha20 keystream, ``s_uv`` the HKDF of the mask-key agreement with each
   neighbour v that completed stage 2, the sign + when u < v.
3b. **consistency check** (Bonawitz et al. 2017) :class:`ConsistencyRequest` (hub ->
   survivors) names the survivors (sent a masked input) and the dropped (completed stage 2
   only); each survivor signs that list once (:class:`ConsistencySignature`, Ed25519 key
   advertised in stage 1). More than half of the participants must sign the same list, so
   the hub cannot show different clients different lists.
4. **unmask** :class:`UnmaskRequest` (hub -> signers) carries the list and the signatures;
   :class:`UnmaskResponse` carries the self-seed shares of survivors and the mask-key
   shares of the dropped. From t shares the hub rebuilds each survivor's self seed and
   each dropped client's mask key, removes all masks and obtains ONLY the sum
   (:meth:`SecAggServer.aggregate`).

Safety. A client signs one survivor list per round and unmasks only for that list, with
enough valid signatures on it: it never releases the mask-key share of a client it saw as
a survivor. It refuses a list that names it dropped, lists a client both ways, has fewer
than t survivors, or leaves it fewer than t - 1 surviving mask partners. The threshold t is
more than half of every share-holder set (2t > k + 1), so even across lists the hub can
never gather t shares of both secrets of one client. The hub itself refuses to accept or
rebuild both secrets of a client, and checks every reconstruction (mask key against its
public key, seed against its commitment): fewer than t shares or a bad share is a
:class:`SecAggError`, never a wrong sum.

Threat model: a hub that may deviate from the protocol and collude with fewer than t of any
client's share holders and fewer than 2T - n clients in all (T: the consistency threshold),
over a transport that authenticates every message (the advertisements of stage 1 must
reach clients as their senders signed them, so the hub cannot substitute keys).

Client state (:class:`ClientState`) holds secrets until the round ends: the two X25519
private keys, the self-mask seed and the decrypted shares of its neighbours' secrets. Store
it only sealed (:func:`seal_client_state`, AEAD under a key the spoke keeps outside the
state directory) and delete it when the round ends. The hub's state (:class:`ServerState`)
holds nothing secret until stage 4, and then only the shares the rules allow.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Literal

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)

from tributary.protocol.signing import canonical_json
from tributary.protocol.training.update import add_mod, subtract_mod

PROTOCOL = "tributary-secagg+-v1"
_SECRET_LEN = 32
_CHUNK = 16  # pycryptodome's Shamir shares 16-byte secrets (GF(2^128))
_PARTY_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class SecAggError(ValueError):
    """The round cannot proceed or complete (too few parties or shares, bad input)."""


class SecAggRefused(SecAggError):
    """A request that would break the protocol's privacy guarantee; refused."""


def _b64decode(value: object) -> object:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise ValueError("not base64") from exc
    return value


#: Bytes that travel as standard base64 in JSON.
B64 = Annotated[
    bytes,
    BeforeValidator(_b64decode),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), when_used="json"),
]
PartyId = Annotated[str, Field(pattern=_PARTY_ID)]
RoundId = Annotated[str, Field(min_length=1, max_length=200)]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def canonical(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): what the transport signs."""
        return canonical_json(self.model_dump(mode="json"))


# --- stage 0: setup --------------------------------------------------------------------


class RoundConfig(_Message):
    """The hub's configuration of one SecAgg+ round, sent to every participant."""

    protocol: Literal["tributary-secagg+-v1"] = PROTOCOL
    round_id: RoundId
    participants: tuple[PartyId, ...]
    threshold: int = Field(ge=1)
    #: Symmetric neighbour lists, self excluded; a client's share holders are its
    #: neighbours and itself.
    neighbours: dict[PartyId, tuple[PartyId, ...]]
    #: Survivors that must sign one survivor list before anyone unmasks: more than half
    #: of the participants, so two different lists can never both be signed.
    consistency_threshold: int = Field(ge=1)
    bits: int = Field(ge=8, le=62)
    vector_length: int = Field(ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> RoundConfig:
        parts = self.participants
        if list(parts) != sorted(set(parts)) or len(parts) < 2:
            raise ValueError("participants must be at least two, unique and sorted")
        if not len(parts) // 2 < self.consistency_threshold <= len(parts):
            raise ValueError("the consistency threshold must exceed half the participants")
        if set(self.neighbours) != set(parts):
            raise ValueError("every participant needs a neighbour list")
        for u, vs in self.neighbours.items():
            if u in vs or len(set(vs)) != len(vs) or not set(vs) <= set(parts):
                raise ValueError(f"bad neighbour list for {u}")
            if any(u not in self.neighbours[v] for v in vs):
                raise ValueError("the neighbour graph must be symmetric")
            holders = len(vs) + 1
            if not holders // 2 < self.threshold <= holders:
                raise ValueError(
                    f"threshold {self.threshold} must exceed half of {u}'s {holders} share "
                    "holders (else the hub could gather both of a client's secrets) and not "
                    "exceed them"
                )
        return self

    def holders(self, party: str) -> tuple[str, ...]:
        """Who holds shares of ``party``'s secrets: its neighbours and itself, sorted."""
        return tuple(sorted((*self.neighbours[party], party)))


def default_degree(n: int) -> int:
    """Neighbours per client: ~2 log2 n (SecAgg+), the complete graph below 8 clients."""
    if n <= 8:
        return n - 1
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def make_round_config(
    round_id: str,
    participants: list[str],
    bits: int,
    vector_length: int,
    degree: int | None = None,
    threshold: int | None = None,
) -> RoundConfig:
    """A round with a random Harary graph (participants shuffled by the OS CSPRNG onto a
    ring, each linked to its k/2 nearest on either side) and, by default, the smallest
    safe threshold (more than half the share holders), which tolerates the most dropouts:
    each client's neighbourhood of k + 1 may lose k + 1 - t."""
    parts = sorted(set(participants))
    n = len(parts)
    if n < 2:
        raise SecAggError("secure aggregation needs at least two participants")
    k = default_degree(n) if degree is None else degree
    if not 1 <= k <= n - 1:
        raise SecAggError(f"degree {k} outside 1..{n - 1}")
    if k < n - 1 and k % 2:
        k += 1  # a Harary ring needs an even degree
    if k >= n - 1:
        neighbours = {u: tuple(v for v in parts if v != u) for u in parts}
        k = n - 1
    else:
        ring = parts[:]
        secrets.SystemRandom().shuffle(ring)
        links: dict[str, set[str]] = {u: set() for u in parts}
        for i, u in enumerate(ring):
            for step in range(1, k // 2 + 1):
                v = ring[(i + step) % n]
                links[u].add(v)
                links[v].add(u)
        neighbours = {u: tuple(sorted(vs)) for u, vs in links.items()}
    t = (k + 1) // 2 + 1 if threshold is None else threshold
    return RoundConfig(
        round_id=round_id,
        participants=tuple(parts),
        threshold=t,
        consistency_threshold=n // 2 + 1,
        neighbours=neighbours,
        bits=bits,
        vector_length=vector_length,
    )


# --- stage 1: keys ---------------------------------------------------------------------


class KeyAdvertisement(_Message):
    """A client's public keys for this round (fresh every round)."""

    round_id: RoundId
    sender: PartyId
    mask_public_key: B64 = Field(min_length=32, max_length=32)
    share_public_key: B64 = Field(min_length=32, max_length=32)
    #: Ed25519 key of this round's consistency signatures (stage 3b).
    signing_public_key: B64 = Field(min_length=32, max_length=32)
    #: SHA-256 over (round, sender, self seed): lets the hub check a rebuilt seed.
    seed_commitment: B64 = Field(min_length=32, max_length=32)


class NeighbourKeys(_Message):
    """The advertisements of a client's neighbours that reached the hub in stage 1, and
    the signing keys of every client that advertised (to check stage 3b signatures). The
    orchestration forwards the advertisements as their senders signed them, so the hub
    cannot substitute keys."""

    round_id: RoundId
    receiver: PartyId
    keys: tuple[KeyAdvertisement, ...]
    signing_keys: dict[PartyId, B64]


# --- stage 2: shares -------------------------------------------------------------------


class Share(_Message):
    """One holder's Shamir share of one 32-byte secret: two 16-byte chunk shares at the
    same x coordinate ``index``."""

    owner: PartyId
    index: int = Field(ge=1, le=65535)
    chunks: tuple[
        Annotated[B64, Field(min_length=_CHUNK, max_length=_CHUNK)], ...
    ] = Field(min_length=2, max_length=2)


class SharePayload(_Message):
    """The plaintext of an :class:`EncryptedShare`."""

    round_id: RoundId
    owner: PartyId
    holder: PartyId
    mask_key: Share
    seed: Share


class EncryptedShare(_Message):
    """ChaCha20-Poly1305 ciphertext of a :class:`SharePayload` for one receiver."""

    sender: PartyId
    receiver: PartyId
    nonce: B64 = Field(min_length=12, max_length=12)
    ciphertext: B64 = Field(max_length=4096)


class ShareBundle(_Message):
    """A client's encrypted shares, one per neighbour (its own share stays with it)."""

    round_id: RoundId
    sender: PartyId
    shares: tuple[EncryptedShare, ...]


class ShareDelivery(_Message):
    """The encrypted shares addressed to one client, routed by the hub."""

    round_id: RoundId
    receiver: PartyId
    shares: tuple[EncryptedShare, ...]


# --- stage 3: masked input -------------------------------------------------------------


class MaskedInput(_Message):
    """Announces a client's masked vector; the vector travels separately (object store)
    as little-endian unsigned integers (:func:`vector_to_bytes`)."""

    round_id: RoundId
    sender: PartyId
    length: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    #: The neighbours it masked with (whose shares reached it), sorted: the hub checks
    #: them against what it routed, so a lost share is an error, never a wrong sum.
    partners: tuple[PartyId, ...]


# --- stage 3b: consistency check --------------------------------------------------------


class ConsistencyRequest(_Message):
    """The hub's view after stage 3, sent to every survivor: who sent a masked input
    (survivors) and who completed stage 2 only (dropped)."""

    round_id: RoundId
    receiver: PartyId
    survivors: tuple[PartyId, ...]
    dropped: tuple[PartyId, ...]


class ConsistencySignature(_Message):
    """A survivor's Ed25519 signature over (round, survivors, dropped). Each client signs
    one list per round; with more than half the participants required to sign the same
    list, the hub cannot show different clients different lists."""

    round_id: RoundId
    sender: PartyId
    signature: B64 = Field(min_length=64, max_length=64)


# --- stage 4: unmask -------------------------------------------------------------------


class UnmaskRequest(_Message):
    """The signed list, sent to every survivor that signed it."""

    round_id: RoundId
    receiver: PartyId
    survivors: tuple[PartyId, ...]
    dropped: tuple[PartyId, ...]
    signatures: dict[PartyId, B64]


class UnmaskResponse(_Message):
    """Self-seed shares of survivors and mask-key shares of dropped clients."""

    round_id: RoundId
    sender: PartyId
    seed_shares: tuple[Share, ...]
    mask_key_shares: tuple[Share, ...]


# --- primitives (all from `cryptography` and pycryptodome) -----------------------------


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _hkdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _agree(private: bytes, public: bytes) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public)
        )
    except ValueError as exc:  # e.g. a low-order public key: all-zero shared secret
        raise SecAggError(f"key agreement failed: {exc}") from exc


def _pair_info(round_id: str, a: str, b: str, purpose: str) -> bytes:
    lo, hi = sorted((a, b))
    return canonical_json({"protocol": PROTOCOL, "purpose": purpose, "round": round_id,
                           "parties": [lo, hi]})


def pairwise_mask_seed(private_key: bytes, peer_public_key: bytes, round_id: str,
                       me: str, peer: str) -> bytes:
    """The seed of the pairwise mask between ``me`` and ``peer`` (both sides derive the same:
    HKDF-SHA256 of their X25519 agreement, bound to the round and the pair)."""
    return _hkdf(_agree(private_key, peer_public_key),
                 _pair_info(round_id, me, peer, "pairwise-mask"))


def _commit_seed(round_id: str, owner: str, seed: bytes) -> bytes:
    head = canonical_json({"protocol": PROTOCOL, "purpose": "seed", "round": round_id,
                           "owner": owner})
    return hashlib.sha256(head + b"\x00" + seed).digest()


def _survivor_list(round_id: str, survivors: tuple[str, ...], dropped: tuple[str, ...]) -> bytes:
    return canonical_json({"protocol": PROTOCOL, "purpose": "consistency", "round": round_id,
                           "survivors": list(survivors), "dropped": list(dropped)})


def _verify(public: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _share_ad(round_id: str, sender: str, receiver: str) -> bytes:
    return canonical_json({"protocol": PROTOCOL, "purpose": "share", "round": round_id,
                           "sender": sender, "receiver": receiver})


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` pseudo-random residues modulo 2^bits: the ChaCha20 keystream under
    ``seed`` (32 bytes; each seed is used for one vector only, so a zero nonce is safe)."""
    dtype = np.dtype("<u4") if bits <= 32 else np.dtype("<u8")
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize))
    out = np.frombuffer(stream, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)
    if bits not in (32, 64):
        np.bitwise_and(out, out.dtype.type((1 << bits) - 1), out=out)
    return out


def _split(secret: bytes, t: int, n: int) -> list[tuple[int, tuple[bytes, bytes]]]:
    parts = [Shamir.split(t, n, secret[i : i + _CHUNK]) for i in range(0, _SECRET_LEN, _CHUNK)]
    return [(idx, (share0, parts[1][j][1])) for j, (idx, share0) in enumerate(parts[0])]


def _combine(shares: list[Share]) -> bytes:
    return b"".join(
        Shamir.combine([(s.index, s.chunks[c]) for s in shares]) for c in range(2)
    )


def vector_dtype(bits: int) -> np.dtype:
    """The array type of vectors of a round: uint32 up to 32 bits, else uint64."""
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


def vector_to_bytes(vector: np.ndarray) -> bytes:
    """A masked vector as stored and digested: little-endian unsigned integers."""
    return vector.astype(vector.dtype.newbyteorder("<"), copy=False).tobytes()


def vector_from_bytes(blob: bytes, bits: int, length: int) -> np.ndarray:
    """The inverse of :func:`vector_to_bytes`, checking the length."""
    dtype = vector_dtype(bits).newbyteorder("<")
    if len(blob) != length * dtype.itemsize:
        raise SecAggError(f"vector of {len(blob)} bytes, expected {length * dtype.itemsize}")
    return np.frombuffer(blob, dtype=dtype).astype(vector_dtype(bits))


def _digest(vector: np.ndarray) -> str:
    return hashlib.sha256(vector_to_bytes(vector)).hexdigest()


# --- the client ------------------------------------------------------------------------


class ClientStage(StrEnum):
    KEYS = "keys"
    SHARES = "shares"
    MASK = "mask"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"


class ClientState(BaseModel):
    """Everything a client must keep between stages. SECRET: see the module docstring."""

    model_config = ConfigDict(extra="forbid")

    config: RoundConfig
    me: PartyId
    stage: ClientStage = ClientStage.KEYS
    mask_private_key: B64
    share_private_key: B64
    signing_private_key: B64
    self_seed: B64
    neighbour_keys: dict[PartyId, KeyAdvertisement] = {}
    signing_keys: dict[PartyId, B64] = {}
    #: Shares this client holds (owner -> payload), its own included.
    held: dict[PartyId, SharePayload] = {}
    #: Neighbours whose shares reached it in stage 2: its pairwise-mask partners.
    partners: tuple[PartyId, ...] = ()
    #: The one survivor list this client signed (stage 3b).
    signed: ConsistencyRequest | None = None
    answered: UnmaskResponse | None = None
    answered_request: UnmaskRequest | None = None


class SecAggClient:
    """One spoke's side of a round; every method is one stage and advances the state."""

    def __init__(self, state: ClientState) -> None:
        self.state = state

    @classmethod
    def start(cls, config: RoundConfig, me: str) -> tuple[SecAggClient, KeyAdvertisement]:
        """Stage 1: fresh keys and seed; returns the client and its advertisement."""
        if me not in config.participants:
            raise SecAggError(f"{me} is not a participant of round {config.round_id}")
        mask_key, share_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        signing_key = Ed25519PrivateKey.generate()
        seed = secrets.token_bytes(_SECRET_LEN)
        state = ClientState(
            config=config,
            me=me,
            mask_private_key=_raw_private(mask_key),
            share_private_key=_raw_private(share_key),
            signing_private_key=signing_key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption()),
            self_seed=seed,
        )
        advert = KeyAdvertisement(
            round_id=config.round_id,
            sender=me,
            mask_public_key=_raw_public(mask_key),
            share_public_key=_raw_public(share_key),
            signing_public_key=signing_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw),
            seed_commitment=_commit_seed(config.round_id, me, seed),
        )
        return cls(state), advert

    def _expect(self, stage: ClientStage, round_id: str, receiver: str | None = None) -> None:
        s = self.state
        if round_id != s.config.round_id:
            raise SecAggError(f"message for round {round_id}, this is {s.config.round_id}")
        if receiver is not None and receiver != s.me:
            raise SecAggError(f"message for {receiver}, this is {s.me}")
        if s.stage != stage:
            raise SecAggError(f"stage {stage} requested but the client is at {s.stage}")

    def share_keys(self, message: NeighbourKeys) -> ShareBundle:
        """Stage 2: check the neighbours' keys, share both secrets among the holders."""
        s, cfg = self.state, self.state.config
        self._expect(ClientStage.KEYS, message.round_id, message.receiver)
        mine = set(cfg.neighbours[s.me])
        keys: dict[str, KeyAdvertisement] = {}
        for advert in message.keys:
            if advert.round_id != cfg.round_id or advert.sender not in mine:
                raise SecAggError(f"keys of {advert.sender}, not a neighbour in this round")
            if advert.sender in keys:
                raise SecAggError(f"two advertisements from {advert.sender}")
            keys[advert.sender] = advert
        seen = {a.mask_public_key for a in keys.values()}
        seen |= {a.share_public_key for a in keys.values()}
        if len(seen) != 2 * len(keys):
            raise SecAggRefused("neighbours' public keys are not all distinct")
        signing = dict(message.signing_keys)
        if any(signing.get(v) != a.signing_public_key for v, a in keys.items()) or not set(
            signing
        ) <= set(cfg.participants) or len(set(signing.values())) != len(signing):
            raise SecAggRefused("signing keys do not match the neighbours' advertisements")
        holders = sorted((*keys, s.me))
        if len(holders) < cfg.threshold:
            raise SecAggError(
                f"only {len(holders)} share holders reachable, threshold is {cfg.threshold}"
            )
        mask_shares = _split(s.mask_private_key, cfg.threshold, len(holders))
        seed_shares = _split(s.self_seed, cfg.threshold, len(holders))
        out = []
        for holder, (idx, mk), (_, sd) in zip(holders, mask_shares, seed_shares, strict=True):
            payload = SharePayload(
                round_id=cfg.round_id,
                owner=s.me,
                holder=holder,
                mask_key=Share(owner=s.me, index=idx, chunks=mk),
                seed=Share(owner=s.me, index=idx, chunks=sd),
            )
            if holder == s.me:
                s.held[s.me] = payload
                continue
            key = _hkdf(
                _agree(s.share_private_key, keys[holder].share_public_key),
                _pair_info(cfg.round_id, s.me, holder, "share-key"),
            )
            nonce = secrets.token_bytes(12)
            ct = ChaCha20Poly1305(key).encrypt(
                nonce, payload.canonical(), _share_ad(cfg.round_id, s.me, holder)
            )
            out.append(EncryptedShare(sender=s.me, receiver=holder, nonce=nonce, ciphertext=ct))
        s.neighbour_keys = keys
        s.signing_keys = signing
        s.stage = ClientStage.SHARES
        return ShareBundle(round_id=cfg.round_id, sender=s.me, shares=tuple(out))

    def receive_shares(self, message: ShareDelivery) -> None:
        """Stage 2 end: decrypt and check the shares addressed to this client; their
        senders become its pairwise-mask partners. Tampered ciphertexts are refused."""
        s, cfg = self.state, self.state.config
        self._expect(ClientStage.SHARES, message.round_id, message.receiver)
        held: dict[str, SharePayload] = {}
        for item in message.shares:
            sender = item.sender
            if item.receiver != s.me or sender not in s.neighbour_keys or sender in held:
                raise SecAggRefused(f"unexpected share from {sender}")
            key = _hkdf(
                _agree(s.share_private_key, s.neighbour_keys[sender].share_public_key),
                _pair_info(cfg.round_id, s.me, sender, "share-key"),
            )
            try:
                plain = ChaCha20Poly1305(key).decrypt(
                    item.nonce, item.ciphertext, _share_ad(cfg.round_id, sender, s.me)
                )
                payload = SharePayload.model_validate_json(plain)
            except (InvalidTag, ValidationError) as exc:
                raise SecAggRefused(f"share from {sender} fails authentication") from exc
            if (payload.round_id, payload.owner, payload.holder) != (cfg.round_id, sender, s.me) \
                    or payload.mask_key.owner != sender or payload.seed.owner != sender:
                raise SecAggRefused(f"share from {sender} is bound to another round or party")
            held[sender] = payload
        if len(held) + 1 < cfg.threshold:
            raise SecAggError(
                f"shares from only {len(held)} neighbours, threshold is {cfg.threshold}"
            )
        s.held.update(held)
        s.partners = tuple(sorted(held))
        s.stage = ClientStage.MASK

    def mask(self, quantised: np.ndarray) -> tuple[MaskedInput, np.ndarray]:
        """Stage 3: ``y = x + PRG(b) + sum_v +/-PRG(s_uv)`` modulo 2^bits. Deterministic
        for a given input, so a retry after a restart sends the same vector."""
        s, cfg = self.state, self.state.config
        if s.stage not in (ClientStage.MASK, ClientStage.CONSISTENCY):
            raise SecAggError(f"cannot mask at stage {s.stage}")
        dtype = vector_dtype(cfg.bits)
        if quantised.shape != (cfg.vector_length,) or quantised.dtype != dtype:
            raise SecAggError(
                f"input must be {cfg.vector_length} values of {dtype}, not "
                f"{quantised.shape} of {quantised.dtype}"
            )
        y = quantised.copy()
        if cfg.bits not in (32, 64) and np.any(y >> np.uint64(cfg.bits)):
            raise SecAggError(f"input values exceed {cfg.bits} bits")
        add_mod(y, prg(s.self_seed, cfg.vector_length, cfg.bits), cfg.bits)
        for v in s.partners:
            seed = pairwise_mask_seed(s.mask_private_key, s.neighbour_keys[v].mask_public_key,
                                      cfg.round_id, s.me, v)
            stream = prg(seed, cfg.vector_length, cfg.bits)
            (add_mod if s.me < v else subtract_mod)(y, stream, cfg.bits)
        s.stage = ClientStage.CONSISTENCY
        return MaskedInput(round_id=cfg.round_id, sender=s.me, length=cfg.vector_length,
                           sha256=_digest(y), partners=s.partners), y

    def sign_survivors(self, request: ConsistencyRequest) -> ConsistencySignature:
        """Stage 3b: sign the hub's survivor list, once per round (the same request is
        signed again identically, for retries; a different one is refused). Refuses a
        list that names this client dropped, lists a client both ways, has fewer than t
        survivors or the consistency threshold, or leaves this client fewer than t - 1
        surviving mask partners (its input would then hang on too few masks)."""
        s, cfg = self.state, self.state.config
        if request.round_id != cfg.round_id or request.receiver != s.me:
            raise SecAggError("consistency request for another round or client")
        if s.signed is not None and request != s.signed:
            raise SecAggRefused("already signed a different survivor list this round")
        if s.stage not in (ClientStage.CONSISTENCY, ClientStage.UNMASK):
            raise SecAggRefused(f"asked to sign survivors at stage {s.stage}")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if list(request.survivors) != sorted(survivors) or list(request.dropped) != sorted(
            dropped
        ):
            raise SecAggRefused("survivor lists must be sorted and unique")
        if survivors & dropped:
            both = sorted(survivors & dropped)
            raise SecAggRefused(f"clients listed as both survivor and dropped: {both}")
        if s.me not in survivors:
            raise SecAggRefused("this client sent its masked input but is not listed a survivor")
        if not (survivors | dropped) <= set(cfg.participants):
            raise SecAggRefused("survivor list names non-participants")
        if len(survivors) < max(cfg.threshold, cfg.consistency_threshold):
            raise SecAggRefused(f"{len(survivors)} survivors: too few to unmask safely")
        if len(survivors & set(s.partners)) + 1 < cfg.threshold:
            raise SecAggRefused("too few of this client's mask partners survive")
        key = Ed25519PrivateKey.from_private_bytes(s.signing_private_key)
        signature = key.sign(_survivor_list(cfg.round_id, request.survivors, request.dropped))
        s.signed = request
        s.stage = ClientStage.UNMASK
        return ConsistencySignature(round_id=cfg.round_id, sender=s.me, signature=signature)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 4: the shares the hub may have, only for the one list this client signed
        and only with enough valid signatures of survivors on it: so no client it saw as
        a survivor can get its mask-key share released. Answers once; repeats the same
        answer only."""
        s, cfg = self.state, self.state.config
        if request.round_id != cfg.round_id or request.receiver != s.me:
            raise SecAggError("unmask request for another round or client")
        if s.answered is not None:
            if request == s.answered_request:
                return s.answered
            raise SecAggRefused("already answered a different unmask request this round")
        if s.stage != ClientStage.UNMASK or s.signed is None:
            raise SecAggRefused(f"asked to unmask at stage {s.stage}, before signing survivors")
        if (request.survivors, request.dropped) != (s.signed.survivors, s.signed.dropped):
            raise SecAggRefused("unmask request differs from the survivor list this client signed")
        data = _survivor_list(cfg.round_id, request.survivors, request.dropped)
        valid = {
            v for v, sig in request.signatures.items()
            if v in request.survivors and v in s.signing_keys
            and _verify(s.signing_keys[v], sig, data)
        }
        if len(valid) < cfg.consistency_threshold:
            raise SecAggRefused(
                f"{len(valid)} valid survivor signatures, {cfg.consistency_threshold} needed"
            )
        response = UnmaskResponse(
            round_id=cfg.round_id,
            sender=s.me,
            seed_shares=tuple(
                s.held[o].seed for o in request.survivors if o in s.held
            ),
            mask_key_shares=tuple(
                s.held[o].mask_key for o in request.dropped if o in s.held
            ),
        )
        s.answered, s.answered_request = response, request
        s.stage = ClientStage.DONE
        return response


def seal_client_state(state: ClientState, key: bytes) -> bytes:
    """The client state encrypted at rest (ChaCha20-Poly1305, 32-byte ``key`` the spoke
    keeps outside its state directory): nonce || ciphertext."""
    nonce = secrets.token_bytes(12)
    return nonce + ChaCha20Poly1305(key).encrypt(
        nonce, state.model_dump_json().encode(), PROTOCOL.encode() + b" client state"
    )


def open_client_state(blob: bytes, key: bytes) -> ClientState:
    """The inverse of :func:`seal_client_state`; a modified blob is refused."""
    try:
        plain = ChaCha20Poly1305(key).decrypt(
            blob[:12], blob[12:], PROTOCOL.encode() + b" client state"
        )
    except InvalidTag as exc:
        raise SecAggRefused("sealed client state fails authentication") from exc
    return ClientState.model_validate_json(plain)


# --- the server ------------------------------------------------------------------------


class ServerStage(StrEnum):
    KEYS = "keys"
    SHARES = "shares"
    MASKED = "masked"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"


class Secret(StrEnum):
    SEED = "seed"
    MASK_KEY = "mask_key"


class ServerState(BaseModel):
    """Everything the hub keeps for a round (small: masked vectors live in the object
    store, named by the digests in ``masked``). Nothing here is a spoke's secret."""

    model_config = ConfigDict(extra="forbid")

    config: RoundConfig
    stage: ServerStage = ServerStage.KEYS
    keys: dict[PartyId, KeyAdvertisement] = {}
    bundles: dict[PartyId, ShareBundle] = {}
    masked: dict[PartyId, MaskedInput] = {}
    survivors: tuple[PartyId, ...] = ()
    dropped: tuple[PartyId, ...] = ()
    signatures: dict[PartyId, ConsistencySignature] = {}
    responses: dict[PartyId, UnmaskResponse] = {}
    #: Which secret the hub has rebuilt per client: never both for one client.
    reconstructed: dict[PartyId, Secret] = {}


class AggregateResult(BaseModel):
    """The round's result: the modular sum of the survivors' quantised inputs."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    total: np.ndarray
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


class SecAggServer:
    """The hub's side of a round. Each ``receive_*`` is idempotent for an identical
    message (broker redelivery) and refuses a conflicting one; ``close_*`` ends a stage
    (at its deadline, with whoever answered)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    @classmethod
    def start(cls, config: RoundConfig) -> SecAggServer:
        return cls(ServerState(config=config))

    def _accept(self, stage: ServerStage, round_id: str, sender: str,
                store: dict, message: _Message) -> bool:
        s = self.state
        if round_id != s.config.round_id:
            raise SecAggError(f"message for round {round_id}, this is {s.config.round_id}")
        if sender not in s.config.participants:
            raise SecAggError(f"{sender} is not a participant")
        if sender in store:
            if store[sender] != message:
                raise SecAggRefused(f"a second, different {stage} message from {sender}")
            return False
        if s.stage != stage:
            raise SecAggError(f"{stage} message from {sender} but the round is at {s.stage}")
        return True

    # stage 1
    def receive_keys(self, advert: KeyAdvertisement) -> None:
        if self._accept(ServerStage.KEYS, advert.round_id, advert.sender, self.state.keys, advert):
            self.state.keys[advert.sender] = advert

    def close_keys(self) -> list[str]:
        """End stage 1; returns who advertised. Fails if fewer than t did."""
        s = self.state
        if len(s.keys) < s.config.threshold:
            raise SecAggError(f"{len(s.keys)} clients sent keys, threshold is {s.config.threshold}")
        s.stage = ServerStage.SHARES
        return sorted(s.keys)

    def keys_for(self, receiver: str) -> NeighbourKeys:
        """A client's neighbours' keys; only after :meth:`close_keys` (all see one set)."""
        s = self.state
        if s.stage == ServerStage.KEYS:
            raise SecAggError("stage 1 is still open")
        if receiver not in s.keys:
            raise SecAggError(f"{receiver} sent no keys")
        return NeighbourKeys(
            round_id=s.config.round_id,
            receiver=receiver,
            keys=tuple(s.keys[v] for v in s.config.neighbours[receiver] if v in s.keys),
            signing_keys={v: a.signing_public_key for v, a in sorted(s.keys.items())},
        )

    # stage 2
    def receive_shares(self, bundle: ShareBundle) -> None:
        s = self.state
        if bundle.sender not in s.keys:
            raise SecAggError(f"shares from {bundle.sender}, who sent no keys")
        if any(e.sender != bundle.sender for e in bundle.shares):
            raise SecAggRefused("bundle contains shares of another sender")
        expected = sorted(v for v in s.config.neighbours[bundle.sender] if v in s.keys)
        if sorted(e.receiver for e in bundle.shares) != expected:
            raise SecAggError(f"{bundle.sender}'s bundle is not one share per neighbour")
        if self._accept(ServerStage.SHARES, bundle.round_id, bundle.sender, s.bundles, bundle):
            s.bundles[bundle.sender] = bundle

    def close_shares(self) -> list[str]:
        s = self.state
        if len(s.bundles) < s.config.threshold:
            raise SecAggError(
                f"{len(s.bundles)} clients sent shares, threshold is {s.config.threshold}"
            )
        s.stage = ServerStage.MASKED
        return sorted(s.bundles)

    def shares_for(self, receiver: str) -> ShareDelivery:
        """The shares addressed to a client; only after :meth:`close_shares`."""
        s = self.state
        if s.stage in (ServerStage.KEYS, ServerStage.SHARES):
            raise SecAggError("stage 2 is still open")
        if receiver not in s.bundles:
            raise SecAggError(f"{receiver} sent no shares")
        items = tuple(e for b in s.bundles.values() for e in b.shares if e.receiver == receiver)
        return ShareDelivery(round_id=s.config.round_id, receiver=receiver,
                             shares=tuple(sorted(items, key=lambda e: e.sender)))

    # stage 3
    def receive_masked(self, message: MaskedInput) -> None:
        s = self.state
        if message.sender not in s.bundles:
            raise SecAggError(f"masked input from {message.sender}, who sent no shares")
        if message.length != s.config.vector_length:
            raise SecAggError(f"masked input of length {message.length}")
        routed = tuple(sorted(v for v in s.config.neighbours[message.sender] if v in s.bundles))
        if message.partners != routed:
            raise SecAggError(
                f"{message.sender} masked with {list(message.partners)}, but the hub routed it "
                f"the shares of {list(routed)}: its input cannot be unmasked"
            )
        if self._accept(ServerStage.MASKED, message.round_id, message.sender, s.masked, message):
            s.masked[message.sender] = message

    def close_masking(self) -> list[ConsistencyRequest]:
        """End stage 3: survivors and dropped are fixed; one request per survivor."""
        s, cfg = self.state, self.state.config
        needed = max(cfg.threshold, cfg.consistency_threshold)
        if len(s.masked) < needed:
            raise SecAggError(
                f"{len(s.masked)} masked inputs, threshold is {needed}: round fails"
            )
        s.survivors = tuple(sorted(s.masked))
        s.dropped = tuple(sorted(set(s.bundles) - set(s.masked)))
        s.stage = ServerStage.CONSISTENCY
        return [
            ConsistencyRequest(round_id=cfg.round_id, receiver=u, survivors=s.survivors,
                               dropped=s.dropped)
            for u in s.survivors
        ]

    # stage 3b
    def receive_signature(self, message: ConsistencySignature) -> None:
        s = self.state
        if message.sender not in s.survivors:
            raise SecAggError(f"survivor signature from {message.sender}, not a survivor")
        data = _survivor_list(s.config.round_id, s.survivors, s.dropped)
        if not _verify(s.keys[message.sender].signing_public_key, message.signature, data):
            raise SecAggRefused(f"bad survivor-list signature from {message.sender}")
        if self._accept(ServerStage.CONSISTENCY, message.round_id, message.sender,
                        s.signatures, message):
            s.signatures[message.sender] = message

    def close_consistency(self) -> list[UnmaskRequest]:
        """End stage 3b: one unmask request, with every signature, per signer."""
        s, cfg = self.state, self.state.config
        if len(s.signatures) < cfg.consistency_threshold:
            raise SecAggError(
                f"{len(s.signatures)} survivors signed, {cfg.consistency_threshold} needed: "
                "round fails"
            )
        s.stage = ServerStage.UNMASK
        signatures = {v: m.signature for v, m in sorted(s.signatures.items())}
        return [
            UnmaskRequest(round_id=cfg.round_id, receiver=u, survivors=s.survivors,
                          dropped=s.dropped, signatures=signatures)
            for u in sorted(s.signatures)
        ]

    # stage 4
    def receive_unmask(self, response: UnmaskResponse) -> None:
        s = self.state
        if response.sender not in s.signatures:
            raise SecAggError(f"unmask response from {response.sender}, who did not sign")
        if any(x.owner not in s.survivors for x in response.seed_shares) or any(
            x.owner not in s.dropped for x in response.mask_key_shares
        ):
            raise SecAggRefused("response offers a secret the hub must not hold")
        if self._accept(ServerStage.UNMASK, response.round_id, response.sender, s.responses,
                        response):
            s.responses[response.sender] = response

    def reconstruct(self, owner: str, secret: Secret) -> bytes:
        """Rebuild one client's seed or mask key from t received shares, checked against
        its commitment or public key. Refuses the second secret of a client."""
        s, t = self.state, self.state.config.threshold
        done = s.reconstructed.get(owner)
        if done is not None and done != secret:
            raise SecAggRefused(f"the hub already rebuilt {owner}'s {done}; never both secrets")
        field = "seed_shares" if secret == Secret.SEED else "mask_key_shares"
        shares = {x.index: x for r in s.responses.values() for x in getattr(r, field)
                  if x.owner == owner}
        if len(shares) < t:
            raise SecAggError(f"{len(shares)} shares of {owner}'s {secret}, threshold is {t}")
        try:
            value = _combine([shares[i] for i in sorted(shares)[:t]])
        except (ValueError, TypeError) as exc:
            raise SecAggError(f"shares of {owner}'s {secret} do not combine: {exc}") from exc
        advert = s.keys[owner]
        if secret == Secret.SEED:
            ok = _commit_seed(s.config.round_id, owner, value) == advert.seed_commitment
        else:
            ok = _raw_public(X25519PrivateKey.from_private_bytes(value)) == advert.mask_public_key
        if not ok:
            raise SecAggError(f"rebuilt {secret} of {owner} does not match its commitment")
        s.reconstructed[owner] = secret
        return value

    def aggregate(self, load: Callable[[str], np.ndarray]) -> AggregateResult:
        """The sum of the survivors' inputs modulo 2^bits. ``load(sender)`` returns a
        survivor's masked vector (checked against its announced digest)."""
        s, cfg = self.state, self.state.config
        if s.stage not in (ServerStage.UNMASK, ServerStage.DONE):
            raise SecAggError(f"cannot aggregate at stage {s.stage}")
        seeds = {u: self.reconstruct(u, Secret.SEED) for u in s.survivors}
        mask_keys = {v: self.reconstruct(v, Secret.MASK_KEY) for v in s.dropped}
        total = np.zeros(cfg.vector_length, dtype=vector_dtype(cfg.bits))
        for u in s.survivors:
            y = load(u)
            if y.dtype != total.dtype or y.shape != total.shape or _digest(y) != s.masked[u].sha256:
                raise SecAggError(f"masked vector of {u} does not match its announced digest")
            add_mod(total, y, cfg.bits)
            subtract_mod(total, prg(seeds[u], cfg.vector_length, cfg.bits), cfg.bits)
        for v, key in mask_keys.items():
            for u in s.survivors:
                if v not in s.masked[u].partners:
                    continue
                seed = pairwise_mask_seed(key, s.keys[u].mask_public_key, cfg.round_id, v, u)
                stream = prg(seed, cfg.vector_length, cfg.bits)
                (subtract_mod if u < v else add_mod)(total, stream, cfg.bits)
        s.stage = ServerStage.DONE
        return AggregateResult(total=total, survivors=s.survivors, dropped=s.dropped)


class LocalRoundTimes(BaseModel):
    """Where :func:`sum_in_one_process` spent its time, in seconds."""

    setup_s: float  # keys and shares, every party
    mask_s: float  # every client's masking, together
    hub_s: float  # consistency, unmasking and the sum


def sum_in_one_process(config: RoundConfig, vectors: dict[str, np.ndarray],
                       clock: Callable[[], float] | None = None
                       ) -> tuple[AggregateResult, LocalRoundTimes]:
    """One SecAgg+ round with every party in this process and none dropping out: every
    stage runs as it does across the broker, without the messages. A reference for the
    benchmarks (the protocol's own cost, and a study's accuracy through it), not a way to
    aggregate: each party's secrets are all in one memory here."""
    import time

    clock = clock or time.perf_counter
    start = clock()
    server = SecAggServer.start(config)
    clients = {}
    for party in sorted(vectors):
        clients[party], advert = SecAggClient.start(config, party)
        server.receive_keys(advert)
    server.close_keys()
    for party, client in clients.items():
        server.receive_shares(client.share_keys(server.keys_for(party)))
    server.close_shares()
    for party, client in clients.items():
        client.receive_shares(server.shares_for(party))
    setup = clock() - start
    masked: dict[str, np.ndarray] = {}
    mask = 0.0
    for party, client in clients.items():
        start = clock()
        message, masked[party] = client.mask(vectors[party])
        mask += clock() - start
        server.receive_masked(message)
    start = clock()
    for check in server.close_masking():
        server.receive_signature(clients[check.receiver].sign_survivors(check))
    for request in server.close_consistency():
        server.receive_unmask(clients[request.receiver].unmask(request))
    result = server.aggregate(masked.__getitem__)
    return result, LocalRoundTimes(setup_s=setup, mask_s=mask, hub_s=clock() - start)
