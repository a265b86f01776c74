"""`benchmarks/criticality.py`: the summary statistics by hand, and the study on a tiny random policy."""

import numpy as np
import pytest

from benchmarks.criticality import compute_criticality_stats


def test_stats_by_hand():
    entropy = [0.1, 0.2, 0.3, 0.9, 1.0, 1.1]
    spread = [0.0, 0.01, 0.0, 0.45, 0.5, 0.3]
    s = compute_criticality_stats(entropy, spread, near_zero=0.05, high=0.4)
    assert s["n_states"] == 6
    assert s["frac_near_zero_std"] == pytest.approx(3 / 6) and s["frac_high_std"] == pytest.approx(2 / 6)
    assert s["entropy_mean_high"] == pytest.approx(0.95) and s["entropy_mean_near_zero"] == pytest.approx(0.2)
    # Ranks of entropy 1..6; ranks of spread with ties: 1.5, 3, 1.5, 5, 6, 4 -> Pearson of the ranks.
    rh, rc = np.arange(1, 7, dtype=float), np.array([1.5, 3, 1.5, 5, 6, 4])
    expected = np.corrcoef(rh, rc)[0, 1]
    assert s["spearman"] == pytest.approx(expected)
    # Every high-spread entropy exceeds every near-zero one: Brunner-Munzel's variance estimate is 0, p undefined.
    assert s["brunner_munzel_p"] is None
    overlapping = compute_criticality_stats([0.1, 0.2, 0.95, 0.9, 1.0, 1.1], spread)
    assert 0 < overlapping["brunner_munzel_p"] < 1


def test_undefined_parts_are_none():
    s = compute_criticality_stats([0.5, 0.5, 0.5], [0.0, 0.0, 0.0])
    assert s["spearman"] is None and s["brunner_munzel_p"] is None and s["entropy_mean_high"] is None
    assert s["frac_near_zero_std"] == 1.0
    with pytest.raises(ValueError, match="same length"):
        compute_criticality_stats([0.1, 0.2], [0.1])
