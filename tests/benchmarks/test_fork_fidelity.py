"""Forks in flight against Alg. 1 (issue 29 item 5): the per-tree statistics by hand and the paired comparison."""

import numpy as np
import pytest

from benchmarks.fork_fidelity import MARGINS, compare, tree_statistics
from carl_core import CARLConfig
from tests.core.conftest import build_tree


def fig_tree():
    """0 -a1-> 1 -a2-> 2 -a3-> 3 (R 1); 1 -a4-> 4 -a5-> 5 (R 0); 0 -a6-> 6 (R 1); forked at 1, then at the root."""
    lp = [-0.5, -1.0]
    tree = build_tree([(0, lp, None), (1, lp, None), (2, lp, 1.0), (1, lp, None), (4, lp, 0.0), (0, lp, 1.0)])
    tree.fork_points = [1, 0]
    return tree


def test_statistics_of_one_tree_by_hand():
    # V = 1, 1 on the first path, 0, 0 on the second, V1 = 0.5, V6 = 1, V0 = 0.75. Forks at depths 1 and 0; at both
    # states the children's values differ (1 vs 0; 0.5 vs 1). Trained (critical): a1, a6 (the root has two
    # children), a2, a4 (state 1 has two): A = -0.25, +0.25, +0.5, -0.5, all nonzero. Outcomes 1, 0, 1: a signal.
    same = CARLConfig(n0=1, n_forks=2)
    s = tree_statistics([fig_tree()], same)
    assert {k: v.tolist() for k, v in s.items()} == {
        "depth_sum": [1.0], "forks": [2.0], "split_forks": [2.0], "nonzero": [4.0], "trained": [4.0],
        "no_signal": [0.0], "generated": [6.0],
    }  # fmt: skip


def test_identical_trees_differ_by_nothing_and_a_shift_is_measured():
    rng = np.random.default_rng(0)
    base = {"depth_sum": rng.integers(0, 9, 50).astype(float), "forks": np.full(50, 6.0),
            "split_forks": rng.integers(0, 6, 50).astype(float), "nonzero": rng.integers(0, 5, 50).astype(float),
            "trained": np.full(50, 5.0), "no_signal": (rng.random(50) < 0.3).astype(float),
            "generated": rng.integers(10, 20, 50).astype(float)}  # fmt: skip
    same = compare(base, {k: v.copy() for k, v in base.items()}, n_boot=200)
    assert all(row["difference"] == 0 and row["low"] == row["high"] == 0 for row in same.values())
    assert all(row["inside_margin"] for row in same.values())
    # Every fork one action deeper: +1 action of mean depth, exactly, far outside the 0.25 margin.
    deeper = compare(base, {**base, "depth_sum": base["depth_sum"] + 6.0}, n_boot=200)["fork_depth"]
    assert deeper["difference"] == pytest.approx(1.0) and deeper["low"] == pytest.approx(1.0)
    assert not deeper["inside_margin"] and MARGINS["fork_depth"] == 0.25
    # 10 % more actions: a ratio of 1.1, outside the 5 % margin.
    more = compare(base, {**base, "generated": base["generated"] * 1.1}, n_boot=200)["actions_generated_per_tree"]
    assert more["ratio"] == pytest.approx(1.1) and not more["inside_margin"]
