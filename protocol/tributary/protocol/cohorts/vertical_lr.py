"""Vertical logistic regression between two parties over the same aligned rows, with the
exchanged vectors under Paillier encryption (python-paillier, ``phe``); no I/O here.

Party A (``features``) holds columns X_A; party B (``label``) holds X_B, an intercept
column and the label y in {-1, +1}. The model is u = X_A w_A + X_B w_B and the loss the
second-order Taylor expansion of the logistic loss around 0 (Hardy et al. 2017),
``l(u) = log 2 - y u / 2 + u^2 / 8``, whose gradient is X^T d / n with the residual
``d = u / 4 - y / 2``. The residual splits into the parties' own shares,
``s_A = u_A / 4`` and ``s_B = u_B / 4 - y / 2``, so d = s_A + s_B and each party's
gradient is ``X_P^T s_P + X_P^T s_Q`` (over n). One round (each party P, peer Q):

1. share: P encrypts s_P under its own key and sends it.
2. cross: P computes ``Enc_Q(X_P^T s_Q + r_P)`` from Q's ciphertexts with a fresh
   random mask r_P it keeps; A also computes ``Enc_B(sum u_A s_B + sum u_A^2 / 8)``, the
   loss term B needs. Results are re-randomised (obfuscated) before they leave.
3. decrypt: Q decrypts P's masked values (and B the loss term) and returns them.
4. apply: P subtracts r_P, adds its own ``X_P^T s_P`` and steps.

Arithmetic is exact on integers: values are fixed point (``FRACTION_BITS``), products
carry twice that, and the masks are uniform on ``MASK_BITS`` more bits than any value can
have, so a masked value is statistically within 2^-``STATISTICAL_BITS`` of uniform
whatever the gradient. The cipher space is the Paillier modulus; the bounds are checked.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Sequence

import numpy as np
from phe import paillier
from pydantic import BaseModel, ConfigDict, Field

#: Fixed-point fraction bits of every value that is encrypted or multiplied in.
FRACTION_BITS = 24
#: Every input value (standardised feature, share, prediction) is below 2^VALUE_BITS.
VALUE_BITS = 20
#: Rows are fewer than 2^ROW_BITS.
ROW_BITS = 24
STATISTICAL_BITS = 64
#: A cross term is below 2^(2 FRACTION + 2 VALUE + ROW) in magnitude; masks have this
#: many bits more than that, so masked values hide it.
MASK_BITS = 2 * FRACTION_BITS + 2 * VALUE_BITS + ROW_BITS + STATISTICAL_BITS
#: Largest ciphertext vector accepted (bytes of its JSON form).
MAX_VECTOR_BYTES = 64 * 1024 * 1024


class VerticalError(ValueError):
    """Input this party will not compute on (out of bounds, wrong length, wrong key)."""


def fixed(values: np.ndarray) -> list[int]:
    """Values as fixed-point integers, refusing any beyond the bound the masks assume."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(np.abs(values) >= 2.0 ** VALUE_BITS):
        raise VerticalError(f"a value is not finite or exceeds 2^{VALUE_BITS}")
    return [int(v) for v in np.rint(values * 2.0 ** FRACTION_BITS).astype(np.int64)]


def unfixed_product(value: int) -> float:
    """A product of two fixed-point values back to a float."""
    return value / 2.0 ** (2 * FRACTION_BITS)


def standardise(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns centred and scaled on this party's own rows (a constant column is only
    centred); returns (standardised, means, scales)."""
    means = columns.mean(axis=0)
    scales = columns.std(axis=0)
    scales = np.where(scales > 0, scales, 1.0)
    return (columns - means) / scales, means, scales


def new_keypair(bits: int) -> tuple[paillier.PaillierPublicKey, paillier.PaillierPrivateKey]:
    return paillier.generate_paillier_keypair(n_length=bits)


def public_key(n_hex: str) -> paillier.PaillierPublicKey:
    return paillier.PaillierPublicKey(int(n_hex, 16))


def private_key(n_hex: str, p_hex: str, q_hex: str) -> paillier.PaillierPrivateKey:
    return paillier.PaillierPrivateKey(public_key(n_hex), int(p_hex, 16), int(q_hex, 16))


def encrypt(key: paillier.PaillierPublicKey, values: Sequence[int]) -> bytes:
    """Integers encrypted (exponent 0: exact), as bytes for the object store."""
    return dump(key, [key.encrypt(int(v)) for v in values])


def dump(key: paillier.PaillierPublicKey, numbers: Sequence[paillier.EncryptedNumber]) -> bytes:
    """Ciphertexts re-randomised (``be_secure``) so a result does not show how it was made."""
    for number in numbers:
        if number.public_key != key or number.exponent != 0:
            raise VerticalError("a ciphertext under another key or not an integer")
    return json.dumps({"n": format(key.n, "x"),
                       "c": [format(x.ciphertext(be_secure=True), "x") for x in numbers]}
                      ).encode()


def load(key: paillier.PaillierPublicKey, data: bytes, length: int
         ) -> list[paillier.EncryptedNumber]:
    """Ciphertexts under ``key``, exactly ``length`` of them, each in Z*_{n^2} range."""
    if len(data) > MAX_VECTOR_BYTES:
        raise VerticalError("ciphertext vector too large")
    try:
        body = json.loads(data)
        n = int(body["n"], 16)
        raw = [int(c, 16) for c in body["c"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise VerticalError(f"not a ciphertext vector: {exc}") from None
    if n != key.n:
        raise VerticalError("ciphertexts under another key")
    if len(raw) != length:
        raise VerticalError(f"{len(raw)} ciphertexts, expected {length}")
    if any(not 0 < c < key.nsquare for c in raw):
        raise VerticalError("a ciphertext outside the key's range")
    return [paillier.EncryptedNumber(key, c, 0) for c in raw]


def decrypt(key: paillier.PaillierPrivateKey, numbers: Sequence[paillier.EncryptedNumber]
            ) -> list[int]:
    out = []
    for number in numbers:
        value = key.decrypt(number)
        if not isinstance(value, int):
            raise VerticalError("a ciphertext that is not an integer")
        out.append(value)
    return out


def inner(columns_fixed: Sequence[Sequence[int]], encrypted: Sequence[paillier.EncryptedNumber]
          ) -> list[paillier.EncryptedNumber]:
    """``Enc(X^T s)`` for fixed-point ``X`` (rows x columns) and ``Enc(s)``."""
    width = len(columns_fixed[0]) if columns_fixed else 0
    out = []
    for j in range(width):
        total = None
        for row, c in zip(columns_fixed, encrypted, strict=True):
            if row[j]:
                term = c * row[j]
                total = term if total is None else total + term
        out.append(total if total is not None else encrypted[0] * 0)
    return out


def new_masks(count: int) -> list[int]:
    return [secrets.randbits(MASK_BITS) for _ in range(count)]


class PartyState(BaseModel):
    """One party's persistent state in a study (kept sealed by the spoke): its key, its
    weights (on its standardised columns), the round's masks and answers."""

    model_config = ConfigDict(extra="forbid")

    role: str
    n_hex: str
    p_hex: str
    q_hex: str
    weights: list[float]
    means: list[float]
    scales: list[float]
    names: list[str]
    round_index: int = 0
    masks: list[int] = Field(default_factory=list)
    answers: dict[str, str] = Field(default_factory=dict, description=(
        "'<round>/<stage>' -> the reply's JSON: a stage redelivered gets the same answer."))
    peer_n_hex: str | None = None


class Party:
    """A party's arithmetic over its standardised columns ``z`` (rows x features; the label
    party's last column is the intercept, all ones) and, label party, ``y`` in {-1, +1}."""

    def __init__(self, state: PartyState, z: np.ndarray, y: np.ndarray | None,
                 hyper_l2: float, learning_rate: float) -> None:
        self.state, self.z, self.y = state, z, y
        self.l2, self.learning_rate = hyper_l2, learning_rate
        self.rows = z.shape[0]
        if self.rows >= 2 ** ROW_BITS:
            raise VerticalError("too many rows")
        self._z_fixed = [fixed(row) for row in z]
        self.pub = public_key(state.n_hex)
        self.priv = private_key(state.n_hex, state.p_hex, state.q_hex)

    @property
    def label(self) -> bool:
        return self.state.role == "label"

    def prediction(self) -> np.ndarray:
        return self.z @ np.asarray(self.state.weights)

    def own_share(self) -> np.ndarray:
        share = self.prediction() / 4
        return share - self.y / 2 if self.label and self.y is not None else share

    def share(self) -> bytes:
        """Stage 1: ``Enc_P(s_P)``."""
        return encrypt(self.pub, fixed(self.own_share()))

    def cross(self, peer: paillier.PaillierPublicKey, peer_share: bytes) -> bytes:
        """Stage 2: ``Enc_Q(X_P^T s_Q + r_P)`` (+ features party: the loss term), with
        fresh masks kept in the state for stage 4."""
        if peer.n == self.pub.n:
            raise VerticalError("the peer's key is this party's own")
        shares = load(peer, peer_share, self.rows)
        masks = new_masks(self.z.shape[1])
        out = [c + r for c, r in zip(inner(self._z_fixed, shares), masks, strict=True)]
        if not self.label:
            u = self.prediction()
            u_fixed = fixed(u)
            term = inner([[v] for v in u_fixed], shares)[0]
            square = int(np.rint(float(u @ u) / 8 * 2.0 ** (2 * FRACTION_BITS)))
            out.append(term + square)
        self.state.masks = masks
        return dump(peer, out)

    def decrypt(self, masked: bytes, peer_features: int) -> tuple[list[int], float | None]:
        """Stage 3: the peer's masked values, decrypted; label party: also the loss."""
        numbers = load(self.pub, masked, peer_features + (1 if self.label else 0))
        values = decrypt(self.priv, numbers)
        if not self.label:
            return values, None
        cross_loss = unfixed_product(values.pop())
        u = self.prediction()
        assert self.y is not None
        own = float(np.sum(u * u / 8 - self.y * u / 2))
        return values, math.log(2) + (own + cross_loss) / self.rows

    def apply(self, values: Sequence[int]) -> None:
        """Stage 4: unmask, add the own term, step."""
        masks = self.state.masks
        if len(values) != len(masks):
            raise VerticalError(f"{len(values)} values for {len(masks)} masks")
        cross = np.array([unfixed_product(v - r) for v, r in zip(values, masks, strict=True)])
        gradient = (self.z.T @ self.own_share() + cross) / self.rows
        weights = np.asarray(self.state.weights)
        penalty = self.l2 * weights
        if self.label:
            penalty[-1] = 0.0  # the intercept is not shrunk
        self.state.weights = list(weights - self.learning_rate * (gradient + penalty))
        self.state.masks = []
        self.state.round_index += 1

    def coefficients(self) -> tuple[dict[str, float], float]:
        """Coefficients on the original scale of the party's attributes and its share of
        the intercept (the label party's includes the model's own intercept)."""
        weights = np.asarray(self.state.weights)
        features = len(self.state.names)
        scaled = weights[:features] / np.asarray(self.state.scales)
        offset = -float(scaled @ np.asarray(self.state.means))
        if self.label:
            offset += float(weights[-1])
        return dict(zip(self.state.names, map(float, scaled), strict=True)), offset


def new_party(role: str, names: list[str], columns: np.ndarray, key_bits: int,
              keypair: tuple[paillier.PaillierPublicKey, paillier.PaillierPrivateKey]
              | None = None) -> tuple[PartyState, np.ndarray]:
    """A party's initial state (zero weights, a new key) and its standardised columns
    (the label party's with the intercept column appended)."""
    z, means, scales = standardise(np.asarray(columns, dtype=np.float64))
    if role == "label":
        z = np.hstack([z, np.ones((z.shape[0], 1))])
    pub, priv = keypair or new_keypair(key_bits)
    state = PartyState(role=role, n_hex=format(pub.n, "x"), p_hex=format(priv.p, "x"),
                       q_hex=format(priv.q, "x"), weights=[0.0] * z.shape[1],
                       means=list(map(float, means)), scales=list(map(float, scales)),
                       names=names)
    return state, z


def labels(values: Sequence[object], positive: object) -> np.ndarray:
    """A label column as {-1, +1}; refuses a column with one class only."""
    y = np.array([1.0 if v == positive else -1.0 for v in values])
    if len(set(y)) < 2:
        raise VerticalError("the label has one class only among the linked rows")
    return y


def central(z_a: np.ndarray, z_b: np.ndarray, y: np.ndarray, rounds: int,
            learning_rate: float, l2: float) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """The same gradient descent on the pooled columns in clear: the reference a vertical
    run must match (``z_b`` with its intercept column last)."""
    w_a, w_b = np.zeros(z_a.shape[1]), np.zeros(z_b.shape[1])
    n, losses = len(y), []
    for _ in range(rounds):
        u = z_a @ w_a + z_b @ w_b
        losses.append(float(math.log(2) + np.mean(u * u / 8 - y * u / 2)))
        d = u / 4 - y / 2
        penalty_b = l2 * w_b
        penalty_b[-1] = 0.0
        w_a = w_a - learning_rate * (z_a.T @ d / n + l2 * w_a)
        w_b = w_b - learning_rate * (z_b.T @ d / n + penalty_b)
    return w_a, w_b, losses
