"""A model update on its way out of a spoke: flatten, clip, noise, quantise; and back.

The spoke (never the algorithm) applies, in this order (:func:`protect_update`):

1. **flatten** the named tensors into one float64 vector, in the order of a
   :class:`TensorSchema` (names sorted: both sides derive the same order);
2. **clip** the vector to L2 norm <= ``clip_bound`` (one global norm over all tensors);
3. **add Gaussian noise** N(0, sigma^2 I) with ``sigma = noise_multiplier * clip_bound``
   (the differential-privacy guarantee is in :mod:`.privacy`);
4. **quantise** each coordinate to an integer modulo 2^bits (:class:`Quantisation`),
   the form SecAgg+ masks and sums.

The hub adds the quantised vectors modulo 2^bits (under SecAgg+ it only ever sees that sum)
and :func:`dequantise_sum` turns the sum back into floats. The quantisation is chosen so
that the sum of up to ``max_summands`` vectors never wraps (a deterministic guarantee, not a
probability): each coordinate is first clipped to [-coordinate_range, coordinate_range]
and scaled so that ``max_summands * (coordinate_range * scale + 1) < 2^(bits-1)``.

Noise generator. Noise is drawn from numpy's ``Generator(PCG64DXSM)`` seeded with 128 bits
from :mod:`secrets` (the OS CSPRNG), a fresh seed for every update, discarded after use.
PCG64DXSM is not a cryptographic generator: someone who saw its raw outputs could predict
further ones. Nobody does: the outputs exist only as noise added to the update, which
leaves the spoke only quantised and masked, and the seed is never stored. The classic
attack on floating-point Gaussian samplers (Mironov 2012) reads the low-order bits of
noised values; quantisation to a grid far coarser than float64 resolution discards those
bits before anything leaves the spoke.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: The float dtypes an update tensor may have (what algorithms write).
FLOAT_DTYPES = ("float16", "float32", "float64")


class UpdateError(ValueError):
    """An update that cannot be processed: wrong names, shapes, non-finite values."""


class TensorSpec(BaseModel):
    """One named tensor of a model: where it sits in the flat vector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=512)
    shape: tuple[int, ...]
    dtype: str = "float32"

    @field_validator("shape")
    @classmethod
    def _non_negative(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        return shape

    @field_validator("dtype")
    @classmethod
    def _float(cls, dtype: str) -> str:
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {FLOAT_DTYPES}")
        return dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class TensorSchema(BaseModel):
    """The layout of a model's flat vector: tensors in name order. Travels with a round so
    the hub and every spoke flatten identically."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tensors: tuple[TensorSpec, ...]

    @model_validator(mode="after")
    def _sorted_unique(self) -> TensorSchema:
        names = [t.name for t in self.tensors]
        if names != sorted(set(names)):
            raise ValueError("tensor names must be unique and sorted")
        return self

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return sum(t.size for t in self.tensors)


def schema_of(update: Mapping[str, np.ndarray]) -> TensorSchema:
    """The schema of an update (e.g. of the initial global model)."""
    specs = []
    for name in sorted(update):
        array = np.asarray(update[name])
        if array.dtype.name not in FLOAT_DTYPES:
            raise UpdateError(f"tensor {name!r} has dtype {array.dtype}, not a float type")
        specs.append(TensorSpec(name=name, shape=tuple(array.shape), dtype=array.dtype.name))
    return TensorSchema(tensors=tuple(specs))


def flatten(update: Mapping[str, np.ndarray], schema: TensorSchema) -> np.ndarray:
    """The update as one float64 vector in schema order. Refuses extra or missing tensors,
    wrong shapes and NaN or infinite values (an algorithm's output is untrusted)."""
    expected = {t.name for t in schema.tensors}
    if set(update) != expected:
        missing, extra = sorted(expected - set(update)), sorted(set(update) - expected)
        raise UpdateError(f"update does not match the schema: missing {missing}, extra {extra}")
    parts = []
    for spec in schema.tensors:
        array = np.asarray(update[spec.name])
        if tuple(array.shape) != spec.shape:
            raise UpdateError(f"tensor {spec.name!r} has shape {array.shape}, not {spec.shape}")
        if not np.issubdtype(array.dtype, np.floating):
            raise UpdateError(f"tensor {spec.name!r} has dtype {array.dtype}, not a float type")
        parts.append(array.astype(np.float64, copy=False).ravel())
    vector = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    if not np.all(np.isfinite(vector)):
        raise UpdateError("update contains NaN or infinite values")
    return vector


def unflatten(vector: np.ndarray, schema: TensorSchema) -> dict[str, np.ndarray]:
    """Named tensors (in each tensor's schema dtype) from a flat vector."""
    if vector.ndim != 1 or vector.shape[0] != schema.size:
        raise UpdateError(f"vector of shape {vector.shape} does not fit a schema of {schema.size}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for spec in schema.tensors:
        out[spec.name] = vector[offset : offset + spec.size].reshape(spec.shape).astype(spec.dtype)
        offset += spec.size
    return out


def clip_l2(vector: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """``vector`` scaled down to L2 norm ``bound`` if longer; returns it and the norm before.

    The norm is global over the whole flat vector (all tensors together), which is what
    bounds the sensitivity the accountant assumes."""
    if not bound > 0:
        raise UpdateError(f"clip bound must be positive, not {bound}")
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm):
        raise UpdateError("update norm is not finite")
    if norm <= bound:
        return vector.astype(np.float64, copy=True), norm
    return vector * (bound / norm), norm


def noise_generator() -> np.random.Generator:
    """A fresh generator seeded with 128 bits from the OS CSPRNG (see the module docstring)."""
    return np.random.Generator(np.random.PCG64DXSM(secrets.randbits(128)))


def add_gaussian_noise(
    vector: np.ndarray, sigma: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``vector + N(0, sigma^2 I)``. ``rng`` only for tests; production draws a fresh one."""
    if sigma < 0 or not math.isfinite(sigma):
        raise UpdateError(f"noise sigma must be finite and >= 0, not {sigma}")
    if sigma == 0:
        return vector.astype(np.float64, copy=True)
    rng = rng or noise_generator()
    return vector + rng.normal(0.0, sigma, size=vector.shape)


def coordinate_range_for(clip_bound: float, sigma: float, tail: float = 6.0) -> float:
    """A per-coordinate range for quantising a clipped and noised update.

    A coordinate of a vector with L2 norm <= C lies in [-C, C]; its noise exceeds
    ``tail * sigma`` in magnitude with probability :func:`coordinate_clip_probability`
    (``tail=6``: 2e-9 per coordinate, so about 0.02 coordinates in 10^7 get clipped, a
    post-processing step that costs no privacy and only biases those coordinates)."""
    return clip_bound + tail * sigma


def coordinate_clip_probability(tail: float) -> float:
    """P(|N(0,1)| > tail): the chance a coordinate of a clipped+noised update is clipped
    by :func:`coordinate_range_for` with that ``tail``."""
    return math.erfc(tail / math.sqrt(2.0))


class Quantisation(BaseModel):
    """Fixed-point quantisation to integers modulo 2^bits, sized so that the sum of up to
    ``max_summands`` quantised vectors never wraps.

    Each coordinate v is clipped to [-R, R] (``R = coordinate_range``), mapped to
    ``q = round(v * scale)`` (stochastic rounding by default: unbiased, |error| < 1/scale;
    deterministic: |error| <= 1/(2 scale)) and stored as ``q mod 2^bits``. With
    ``scale = (2^(bits-1) - 1 - n) / (n R)`` and ``n = max_summands``, any sum of at most n
    values has magnitude <= n (R scale + 1) <= 2^(bits-1) - 1, so it is recovered exactly
    from its residue modulo 2^bits (as a signed integer). The error of a dequantised sum of
    n vectors is therefore < n / scale per coordinate (:meth:`sum_error_bound`), plus the
    effect of any coordinate clipping (see :func:`coordinate_range_for`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int = Field(32, ge=8, le=62)
    coordinate_range: float = Field(gt=0, allow_inf_nan=False)
    max_summands: int = Field(ge=1)
    stochastic: bool = True

    @model_validator(mode="after")
    def _room(self) -> Quantisation:
        if self.scale <= 0:
            raise ValueError(f"{self.bits} bits leave no room for {self.max_summands} summands")
        return self

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The array type of quantised vectors: uint32 up to 32 bits, else uint64."""
        return np.uint32 if self.bits <= 32 else np.uint64

    @property
    def scale(self) -> float:
        n = self.max_summands
        return (2 ** (self.bits - 1) - 1 - n) / (n * self.coordinate_range)

    def sum_error_bound(self, summands: int) -> float:
        """Max |dequantised sum - sum of the range-clipped inputs| per coordinate."""
        per_value = 1.0 / self.scale if self.stochastic else 0.5 / self.scale
        return summands * per_value


def reduce_mod(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers (any integer dtype, possibly negative) as residues modulo 2^bits in the
    quantised array type (uint32 up to 32 bits, else uint64)."""
    wide = values.astype(np.int64, copy=False).view(np.uint64) & np.uint64((1 << bits) - 1)
    return wide.astype(np.uint32) if bits <= 32 else wide


def add_mod(total: np.ndarray, other: np.ndarray, bits: int) -> np.ndarray:
    """``total + other`` modulo 2^bits (in place on ``total``, which is returned)."""
    np.add(total, other, out=total)  # unsigned arithmetic wraps modulo 2^32 or 2^64
    if bits not in (32, 64):
        np.bitwise_and(total, total.dtype.type((1 << bits) - 1), out=total)
    return total


def subtract_mod(total: np.ndarray, other: np.ndarray, bits: int) -> np.ndarray:
    """``total - other`` modulo 2^bits (in place on ``total``, which is returned)."""
    np.subtract(total, other, out=total)
    if bits not in (32, 64):
        np.bitwise_and(total, total.dtype.type((1 << bits) - 1), out=total)
    return total


def quantise(
    vector: np.ndarray, quantisation: Quantisation, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, int]:
    """The vector as residues modulo 2^bits; returns it and how many coordinates fell
    outside the range and were clipped (for the spoke's log)."""
    r = quantisation.coordinate_range
    clipped = int(np.count_nonzero(np.abs(vector) > r))
    scaled = np.clip(vector, -r, r) * quantisation.scale
    if quantisation.stochastic:
        rng = rng or noise_generator()
        integers = np.floor(scaled + rng.random(scaled.shape))
    else:
        integers = np.rint(scaled)
    return reduce_mod(integers.astype(np.int64), quantisation.bits), clipped


def dequantise_sum(total: np.ndarray, quantisation: Quantisation, summands: int) -> np.ndarray:
    """The float sum behind ``total``, the modular sum of ``summands`` quantised vectors."""
    if not 1 <= summands <= quantisation.max_summands:
        raise UpdateError(
            f"{summands} summands outside 1..{quantisation.max_summands}: the sum may have wrapped"
        )
    bits = quantisation.bits
    residues = total.astype(np.uint64) & np.uint64((1 << bits) - 1)
    signed = residues.astype(np.int64)
    signed[residues >= np.uint64(1 << (bits - 1))] -= np.int64(1 << bits)
    return signed.astype(np.float64) / quantisation.scale


class ProtectedUpdate(BaseModel):
    """What :func:`protect_update` reports next to the quantised vector (for the spoke's
    log and audit; none of it is secret beyond the update norm, which stays on the spoke)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    norm_before_clipping: float
    clipped: bool
    coordinates_range_clipped: int
    sigma: float


def protect_update(
    update: Mapping[str, np.ndarray],
    schema: TensorSchema,
    clip_bound: float,
    noise_multiplier: float,
    quantisation: Quantisation,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, ProtectedUpdate]:
    """Flatten, clip to ``clip_bound``, add N(0, (noise_multiplier * clip_bound)^2) and
    quantise: the spoke's pipeline before SecAgg+ masking. ``rng`` only for tests."""
    vector = flatten(update, schema)
    clipped, norm = clip_l2(vector, clip_bound)
    sigma = noise_multiplier * clip_bound
    noised = add_gaussian_noise(clipped, sigma, rng)
    quantised, out_of_range = quantise(noised, quantisation, rng)
    return quantised, ProtectedUpdate(
        norm_before_clipping=norm,
        clipped=norm > clip_bound,
        coordinates_range_clipped=out_of_range,
        sigma=sigma,
    )
