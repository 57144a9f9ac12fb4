"""Comparing two settings: the paired mean difference of a metric and its percentile bootstrap 95% confidence interval."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10000
SEED = 0


@dataclass(frozen=True)
class Difference:
    """mean(b - a) over the n paired items, with the bootstrap confidence interval [low, high]."""

    metric: str
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.n > 0 and (self.low > 0 or self.high < 0)


def bootstrap_ci(diffs: Sequence[float], resamples: int = RESAMPLES, level: float = 0.95,
                 seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap (Efron): resample the n paired differences with replacement, take the 2.5 / 97.5% of the means."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_difference(metric: str, a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES,
                      seed: int = SEED) -> Difference:
    """Setting b against setting a on the same items (same case and seed): mean(b - a) and its 95% interval."""
    if len(a) != len(b):
        raise ValueError(f"{metric}: {len(a)} values for one setting but {len(b)} for the other; pair them by case "
                         "and seed")
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))]
    if not pairs:
        nan = float("nan")
        return Difference(metric, 0, nan, nan, nan, nan, nan)
    xa = np.array([p[0] for p in pairs], dtype=np.float64)
    xb = np.array([p[1] for p in pairs], dtype=np.float64)
    low, high = bootstrap_ci(xb - xa, resamples=resamples, seed=seed)
    return Difference(metric, len(pairs), float(xa.mean()), float(xb.mean()), float((xb - xa).mean()), low, high)
