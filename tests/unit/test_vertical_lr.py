"""Vertical logistic regression on synthetic split data: two parties, each with its own
Paillier key, exchange only ciphertexts and masked integers, and end with the model the
same gradient descent gives on the pooled data (within ``TOLERANCE``); the pooled model
also agrees with exact logistic regression on nearly every prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest
from phe import paillier

from tributary.protocol.cohorts import vertical_lr as lr
from tributary.protocol.cohorts.vertical_lr import Party, VerticalError

#: Largest |vertical - central| of any coefficient: the fixed-point rounding (2^-24 per
#: value) accumulated over the rounds, far below anything that changes a prediction.
TOLERANCE = 1e-5
ROUNDS, RATE, L2 = 15, 0.5, 0.01
KEY_BITS = 1024  # tests only: the protocol's default is 2048


def synthetic(n: int = 120, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    imaging = rng.normal(size=(n, 3)) * [2.0, 10.0, 0.5] + [1.0, 50.0, -2.0]
    clinical = rng.normal(size=(n, 2)) * [12.0, 1.0] + [60.0, 0.0]
    z = ((imaging - imaging.mean(0)) / imaging.std(0)) @ [1.2, -0.8, 0.5] \
        + ((clinical - clinical.mean(0)) / clinical.std(0)) @ [0.7, -1.0] + 0.3
    y = np.where(rng.random(n) < 1 / (1 + np.exp(-z)), 1.0, -1.0)
    return imaging, clinical, y


def run_vertical(imaging: np.ndarray, clinical: np.ndarray, y: np.ndarray
                 ) -> tuple[Party, Party, list[float]]:
    """Both parties' code exactly as the spokes run it, with the messages' bytes passed
    between them in place of the broker and the object store."""
    a_state, z_a = lr.new_party("features", ["f0", "f1", "f2"], imaging, KEY_BITS)
    b_state, z_b = lr.new_party("label", ["age", "marker"], clinical, KEY_BITS)
    a = Party(a_state, z_a, None, L2, RATE)
    b = Party(b_state, z_b, y, L2, RATE)
    losses = []
    for _ in range(ROUNDS):
        share_a, share_b = a.share(), b.share()
        cross_a = a.cross(b.pub, share_b)  # under B's key
        cross_b = b.cross(a.pub, share_a)  # under A's key
        for_a, loss = b.decrypt(cross_a, z_a.shape[1])
        for_b, none = a.decrypt(cross_b, z_b.shape[1])
        assert none is None and loss is not None
        losses.append(loss)
        a.apply(for_a)
        b.apply(for_b)
    return a, b, losses


def test_vertical_matches_central_training() -> None:
    imaging, clinical, y = synthetic()
    a, b, losses = run_vertical(imaging, clinical, y)
    z_a, _, _ = lr.standardise(imaging)
    z_b, _, _ = lr.standardise(clinical)
    z_b = np.hstack([z_b, np.ones((len(y), 1))])
    w_a, w_b, central_losses = lr.central(z_a, z_b, y, ROUNDS, RATE, L2)
    assert np.max(np.abs(np.asarray(a.state.weights) - w_a)) < TOLERANCE
    assert np.max(np.abs(np.asarray(b.state.weights) - w_b)) < TOLERANCE
    assert np.allclose(losses, central_losses, atol=TOLERANCE)
    assert losses[-1] < losses[0] - 0.05  # it learned something
    # The pooled model against exact logistic regression (many steps of the real loss).
    z = np.hstack([z_a, z_b])
    w = np.zeros(z.shape[1])
    for _ in range(3000):
        w -= 0.5 * (z.T @ (-y / (1 + np.exp(y * (z @ w)))) / len(y))
    vertical = np.hstack([a.state.weights, b.state.weights])
    agree = np.mean(np.sign(z @ vertical) == np.sign(z @ w))
    assert agree >= 0.95, agree
    # Coefficients on the original scale give the same predictions as the standardised.
    coef_a, off_a = a.coefficients()
    coef_b, off_b = b.coefficients()
    u = imaging @ list(coef_a.values()) + clinical @ list(coef_b.values()) + off_a + off_b
    assert np.allclose(u, z @ vertical, atol=1e-9)


def test_what_crosses_is_ciphertext_or_masked() -> None:
    """The values B decrypts for A are the true cross-gradient plus a mask as wide as
    ``MASK_BITS``: two runs on the same data send different masked values."""
    imaging, clinical, y = synthetic(n=30)
    a_state, z_a = lr.new_party("features", ["f0", "f1", "f2"], imaging, KEY_BITS)
    b_state, z_b = lr.new_party("label", ["age", "marker"], clinical, KEY_BITS)
    a, b = Party(a_state, z_a, None, 0, RATE), Party(b_state, z_b, y, 0, RATE)
    share_b = b.share()
    assert json.loads(share_b)["n"] == b.state.n_hex
    first, _ = b.decrypt(a.cross(b.pub, share_b), 3)
    second, _ = b.decrypt(a.cross(b.pub, share_b), 3)
    assert first != second
    assert all(v.bit_length() > lr.MASK_BITS - 16 for v in first + second)
    # Two encryptions of the same share differ (Paillier is randomised).
    assert json.loads(b.share())["c"] != json.loads(share_b)["c"]


def test_hostile_inputs_are_refused() -> None:
    imaging, clinical, y = synthetic(n=25)
    a_state, z_a = lr.new_party("features", ["f0", "f1", "f2"], imaging, KEY_BITS)
    b_state, z_b = lr.new_party("label", ["age", "marker"], clinical, KEY_BITS)
    a, b = Party(a_state, z_a, None, 0, RATE), Party(b_state, z_b, y, 0, RATE)
    share_b = b.share()
    other = paillier.generate_paillier_keypair(n_length=KEY_BITS)[0]
    with pytest.raises(VerticalError, match="another key"):
        a.cross(other, share_b)  # a key that is not the one the vector was made under
    with pytest.raises(VerticalError, match="own"):
        a.cross(a.pub, a.share())  # asked to mask for itself: it would learn its inputs
    body = json.loads(share_b)
    with pytest.raises(VerticalError, match="expected"):
        a.cross(b.pub, json.dumps({**body, "c": body["c"][:-1]}).encode())
    with pytest.raises(VerticalError, match="range"):
        a.cross(b.pub, json.dumps({**body, "c": ["0", *body["c"][1:]]}).encode())
    with pytest.raises(VerticalError, match="not a ciphertext"):
        a.cross(b.pub, b"[1, 2")
    with pytest.raises(VerticalError, match="exceeds"):
        lr.fixed(np.array([2.0 ** 21]))
    with pytest.raises(VerticalError, match="one class"):
        lr.labels(["x"] * 5, "x")
    with pytest.raises(VerticalError):
        a.decrypt(lr.encrypt(other, [1, 2, 3, 4]), 4)
