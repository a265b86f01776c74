"""Statistics of the evaluation: the paired bootstrap interval of a difference between two models."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Mean of a - b over paired questions with a percentile paired-bootstrap interval (scipy.stats.bootstrap).

    Resampling questions with replacement and taking mean(a) - mean(b) on the same draw is the bootstrap of the mean
    of the per-question differences, which is what is computed. Questions where either value is NaN are dropped.
    """
    from scipy.stats import bootstrap

    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    d = np.array([x - y for x, y in pairs], dtype=float)
    if len(d) == 0:
        return {"diff": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    mean = float(d.mean())
    if len(d) < 2 or np.all(d == d[0]):  # no spread: every resample has the same mean
        return {"diff": mean, "low": mean, "high": mean, "n": len(d)}
    result = bootstrap(
        (d,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return {"diff": mean, "low": float(low), "high": float(high), "n": len(d)}
