"""`recipe.carl.evaluate.report`: the paired comparison of two models (`question_difference`, `stats` with one seed)
against a slow textbook reference, and its edge cases."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from recipe.carl.evaluate.report import question_difference


def slow_percentile_bootstrap(a, b, resamples, confidence=0.95, seed=1):
    """The textbook paired bootstrap, one question at a time: resample questions, difference of the two means."""
    rng = random.Random(seed)
    n = len(a)
    means = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        means.append(sum(a[i] for i in idx) / n - sum(b[i] for i in idx) / n)
    means.sort()
    tail = (1 - confidence) / 2
    return np.quantile(means, tail), np.quantile(means, 1 - tail)


def test_paired_interval_matches_a_slow_reference():
    rng = np.random.default_rng(3)
    a = (rng.random(200) < 0.55).astype(float).tolist()  # EM of two correlated models on 200 questions
    b = [x if rng.random() < 0.8 else 1.0 - x for x in a]
    fast = question_difference(a, b, n_boot=10_000, seed=0)
    low, high = slow_percentile_bootstrap(a, b, resamples=10_000)
    assert fast["diff"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
    assert fast["low"] == pytest.approx(low, abs=0.006) and fast["high"] == pytest.approx(high, abs=0.006)
    # and, at this n, the normal approximation of the paired differences
    d = np.array(a) - np.array(b)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert (fast["high"] - fast["low"]) / 2 == pytest.approx(half, rel=0.1)


def test_paired_interval_edge_cases():
    assert question_difference([1.0, 0.0, 1.0], [0.0, -1.0, 0.0]) == {"diff": 1.0, "low": 1.0, "high": 1.0, "n": 3}
    nan = float("nan")
    out = question_difference([1.0, nan, 0.0, 1.0], [0.0, 1.0, nan, 1.0])
    assert out["n"] == 2 and out["diff"] == 0.5
    assert math.isnan(question_difference([], [])["diff"])
