"""The statistics behind the figures: confidence intervals of proportions and means (SciPy),
the empirical ROC curve, and the AUC with its DeLong confidence interval (numpy).

DeLong rather than a bootstrap for the AUC: it is closed-form and deterministic, so a
re-aggregation on every arriving result is cheap and an in-process run and a Celery worker
give bit-identical figures without sharing a random stream. It is the default of pROC."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np
from scipy import stats

PROPORTION_METHODS = {"wilson": "wilson", "clopper-pearson": "exact"}


@dataclass(frozen=True)
class Interval:
    low: float | None
    high: float | None


@lru_cache(maxsize=65536)  # a snapshot of 200 spokes asks again for the same counts
def proportion_ci(successes: int, n: int, method: str = "wilson",
                  confidence: float = 0.95) -> Interval:
    """Wilson score interval (Wilson 1927), or the exact Clopper-Pearson interval (1934)."""
    if n == 0:
        return Interval(None, None)
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence,
                                                     method=PROPORTION_METHODS[method])
    return Interval(float(ci.low), float(ci.high))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean."""
    if len(values) < 2:
        return Interval(None, None)
    array = np.asarray(values, dtype=float)
    sem = float(stats.sem(array))
    if sem == 0:
        mean = float(array.mean())
        return Interval(mean, mean)
    low, high = stats.t.interval(confidence, len(array) - 1, loc=float(array.mean()), scale=sem)
    return Interval(float(low), float(high))


def mean_ci_from_moments(n: int, mean: float | None, sd: float | None,
                         confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean from n, the mean and the sample standard deviation
    (what running sums give; the same interval as :func:`mean_ci` of the values)."""
    if n < 2 or mean is None or sd is None:
        return Interval(None, None)
    sem = sd / math.sqrt(n)
    if sem == 0:
        return Interval(mean, mean)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return Interval(float(low), float(high))


def roc_curve(scores: Sequence[float], labels: Sequence[bool],
              drop_intermediate: bool = True) -> list[tuple[float | None, float, float]]:
    """(threshold, fpr, tpr) from (0, 0) through every distinct score, highest first; a case
    is called positive when its score is at or above the threshold. Points on a straight
    segment between their neighbours are dropped (as scikit-learn does by default): the
    curve is the same, the plot and the snapshot smaller."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    positives, negatives = int(y.sum()), int((~y).sum())
    if not positives or not negatives:
        raise ValueError("a ROC curve needs at least one positive and one negative case")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps, fps, thresholds = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie], s[last_of_tie]
    if drop_intermediate and len(tps) > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps, fps, thresholds = np.r_[0, tps], np.r_[0, fps], np.r_[np.nan, thresholds]
    return [(None if np.isnan(t) else float(t), float(f), float(r)) for t, f, r in
            zip(thresholds, np.round(fps / negatives, 6), np.round(tps / positives, 6),
                strict=True)]


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    return stats.rankdata(x, method="average")


@dataclass(frozen=True)
class AucEstimate:
    auc: float
    variance: float | None
    low: float | None
    high: float | None


def auc_delong(scores: Sequence[float], labels: Sequence[bool],
               confidence: float = 0.95) -> AucEstimate:
    """AUC (Mann-Whitney, ties count one half) with DeLong's variance (DeLong, DeLong and
    Clarke-Pearson 1988) computed by midranks as in Sun and Xu (2014); the interval is
    AUC ± z·SE, clipped to [0, 1] as pROC does."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        raise ValueError("the AUC needs at least one positive and one negative case")
    ranks_all = _midranks(np.concatenate([pos, neg]))
    ranks_pos, ranks_neg = _midranks(pos), _midranks(neg)
    auc = float((ranks_all[:m].sum() - m * (m + 1) / 2) / (m * n))
    if m < 2 or n < 2:
        return AucEstimate(auc, None, None, None)
    v10 = (ranks_all[:m] - ranks_pos) / n  # structural components of the positives
    v01 = 1.0 - (ranks_all[m:] - ranks_neg) / m  # ... and of the negatives
    variance = float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    se = math.sqrt(variance)
    return AucEstimate(auc, variance, max(0.0, auc - z * se), min(1.0, auc + z * se))


def bootstrap_ci(statistic, samples: np.ndarray, confidence: float = 0.95,  # type: ignore[no-untyped-def]
                 replicates: int = 2000, seed: int = 20240611) -> Interval:
    """Percentile bootstrap over rows of ``samples`` (cases) with a fixed seed, so every run
    on the same data gives the same interval. ``statistic`` maps an array of resampled row
    indices (replicates x rows) to one value per replicate (nan when undefined)."""
    rows = len(samples)
    if rows < 2:
        return Interval(None, None)
    rng = np.random.default_rng(seed)
    values = statistic(rng.integers(0, rows, size=(replicates, rows)))
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return Interval(None, None)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return Interval(float(low), float(high))
