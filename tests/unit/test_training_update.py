"""Update protection (tributary.protocol.training.update): clip, noise, quantise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tributary.protocol.training import update as up


def test_flatten_roundtrip_and_hostile_updates() -> None:
    update = {"layer.w": np.arange(6, dtype=np.float32).reshape(2, 3),
              "layer.b": np.ones(3, dtype=np.float64)}
    schema = up.schema_of(update)
    assert [t.name for t in schema.tensors] == ["layer.b", "layer.w"] and schema.size == 9
    back = up.unflatten(up.flatten(update, schema), schema)
    for name, array in update.items():
        assert back[name].dtype == array.dtype and np.array_equal(back[name], array)
    with pytest.raises(up.UpdateError, match="missing"):
        up.flatten({"layer.w": update["layer.w"]}, schema)
    with pytest.raises(up.UpdateError, match="shape"):
        up.flatten({**update, "layer.b": np.ones(4)}, schema)
    with pytest.raises(up.UpdateError, match="NaN"):
        up.flatten({**update, "layer.b": np.array([1.0, np.nan, 0.0])}, schema)


def test_clip_is_a_global_l2_norm() -> None:
    vector = np.array([3.0, 4.0, 0.0])
    clipped, norm = up.clip_l2(vector, 1.0)
    assert norm == 5.0 and math.isclose(float(np.linalg.norm(clipped)), 1.0)
    assert np.allclose(clipped, vector / 5.0)
    same, _ = up.clip_l2(vector, 10.0)
    assert np.array_equal(same, vector)


def test_noise_has_the_configured_scale() -> None:
    """The spoke's full pipeline on a zero update: what leaves is noise with sd z*C (plus
    quantisation error, negligible). Tolerances: 6 standard errors of the estimators."""
    clip, z, d = 0.5, 1.3, 400_000
    sigma = z * clip
    update = {"w": np.zeros(d, dtype=np.float32)}
    q = up.Quantisation(bits=32, coordinate_range=up.coordinate_range_for(clip, sigma),
                        max_summands=1)
    quantised, report = up.protect_update(update, up.schema_of(update), clip, z, q)
    noise = up.dequantise_sum(quantised, q, 1)
    assert report.sigma == sigma and report.coordinates_range_clipped == 0
    se_mean, se_sd = sigma / math.sqrt(d), sigma / math.sqrt(2 * d)
    assert abs(noise.mean()) < 6 * se_mean
    assert abs(noise.std() - sigma) < 6 * se_sd + q.sum_error_bound(1)
    # and a wrong scale would fail: 1% off is far outside the tolerance
    assert 6 * se_sd < 0.01 * sigma
    # fresh generator each time: two updates never share noise
    again, _ = up.protect_update(update, up.schema_of(update), clip, z, q)
    assert not np.array_equal(again, quantised)


def test_sum_never_wraps_at_the_extremes() -> None:
    q = up.Quantisation(bits=16, coordinate_range=3.0, max_summands=7)
    for value in (3.0, -3.0, 1e9, -1e9):  # out-of-range values are clipped first
        vector = np.full(5, value)
        total = np.zeros(5, dtype=q.dtype)
        for _ in range(7):
            up.add_mod(total, up.quantise(vector, q)[0], q.bits)
        expected = 7 * math.copysign(3.0, value)
        assert np.all(np.abs(up.dequantise_sum(total, q, 7) - expected) < q.sum_error_bound(7))
    with pytest.raises(up.UpdateError, match="wrapped"):
        up.dequantise_sum(total, q, 8)


def test_quantisation_error_bounds() -> None:
    rng = np.random.default_rng(3)
    values = rng.uniform(-2, 2, size=10_000)
    for stochastic in (True, False):
        q = up.Quantisation(bits=20, coordinate_range=2.0, max_summands=4, stochastic=stochastic)
        back = up.dequantise_sum(up.quantise(values, q, rng)[0], q, 1)
        assert np.max(np.abs(back - values)) <= q.sum_error_bound(1)
    # stochastic rounding is unbiased: the mean error vanishes at ~1/(scale sqrt(n))
    q = up.Quantisation(bits=12, coordinate_range=2.0, max_summands=1)
    constant = np.full(100_000, 0.3)
    back = up.dequantise_sum(up.quantise(constant, q, rng)[0], q, 1)
    assert abs(back.mean() - 0.3) < 6 / (q.scale * math.sqrt(constant.size))
    with pytest.raises(ValueError, match="no room"):
        up.Quantisation(bits=8, coordinate_range=1.0, max_summands=200)
