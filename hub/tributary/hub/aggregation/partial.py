"""Exact running sums: what an incremental aggregator keeps per spoke instead of every value.

A contribution is a mapping of names to integers (counts, and sums of values and of squares
in units of 2**-1074 and 2**-2148, the smallest steps of a float and of its square), so
adding and subtracting are exact: the sums do not depend on the order results arrived in,
a result replaced by a later attempt is subtracted without a trace, and figures derived
from them are identical to those derived from all the values at once."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from fractions import Fraction

Sums = dict[str, int]

#: 2**-SCALE is the smallest positive float step (the subnormal minimum).
SCALE = 1074
_ONE = 1 << SCALE
_ONE_SQUARED = 1 << (2 * SCALE)


def exact(value: float) -> int:
    """``value`` in units of 2**-1074, exactly (every finite float is one)."""
    numerator, denominator = float(value).as_integer_ratio()
    return numerator * (_ONE // denominator)


def exact_square(value: float) -> int:
    """``value`` squared in units of 2**-2148, exactly."""
    numerator, denominator = float(value).as_integer_ratio()
    return numerator * numerator * (_ONE_SQUARED // (denominator * denominator))


def add(into: Sums, more: Mapping[str, int], sign: int = 1) -> Sums:
    """Add (``sign`` 1) or subtract (-1) ``more`` into ``into``; zero entries are dropped."""
    for key, value in more.items():
        total = into.get(key, 0) + sign * value
        if total:
            into[key] = total
        else:
            into.pop(key, None)
    return into


def total(contributions: Iterable[Mapping[str, int]]) -> Sums:
    sums: Sums = {}
    for contribution in contributions:
        add(sums, contribution)
    return sums


def dump(sums: Mapping[str, int]) -> dict[str, str]:
    """As JSON: integers as hexadecimal strings (they exceed JSON's safe range; hexadecimal
    converts in linear time, decimal in quadratic)."""
    return {key: format(value, "x") for key, value in sorted(sums.items())}


def load(raw: Mapping[str, object] | None) -> Sums:
    return {str(key): int(str(value), 16) for key, value in (raw or {}).items()}


def moments(n: int, sum_units: int, squares_units: int) -> tuple[float | None, float | None]:
    """Mean and sample variance (n - 1), each the float nearest the exact value; None where
    undefined (no value; one value for the variance)."""
    if n <= 0:
        return None, None
    total_sum = Fraction(sum_units, _ONE)
    mean = total_sum / n
    if n < 2:
        return float(mean), None
    variance = (Fraction(squares_units, _ONE_SQUARED) - total_sum * mean) / (n - 1)
    try:
        return float(mean), float(max(variance, Fraction(0)))
    except OverflowError:  # values near the float's limits: as numpy says, infinite
        return float(mean), math.inf
