"""Invariants of Alg. 2 / Eq. 13 / Eq. 15 on many random trees grown by the real planner."""

import copy
import random

import pytest
import torch

from carl_core import CARLConfig, compute_tree_stats, score_trees

from .conftest import random_tree


@pytest.mark.parametrize("seed", range(20))
def test_path_advantages_telescope_to_leaf_reward_minus_root_value(seed):
    rng = random.Random(seed)
    config = CARLConfig(n0=rng.randint(1, 4), n_forks=rng.randint(0, 10), max_actions=rng.randint(1, 6))
    tree = random_tree(rng, config)
    s = score_trees([tree], config)
    for leaf in tree.leaves():
        path = tree.path(leaf)
        total = sum(float(s.edge_advantage[v]) for v in path[1:])
        assert total == pytest.approx(tree.nodes[leaf].reward - float(s.node_value[0]))


@pytest.mark.parametrize("seed", range(30))
def test_eq15_bounds_for_carl_lite(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 16)
    config = CARLConfig(n0=1, n_forks=n, max_actions=rng.randint(2, 6), forks_in_flight=rng.choice([1, 2, 4]))
    tree = random_tree(rng, config, p_stop=0.2)
    s = score_trees([tree], config)
    d_upd = int(s.trained.sum())
    # Each fork adds one trained edge; the first fork at a state also makes its old edge trainable:
    # |D_upd| = N + #distinct forked states, hence N + 1 <= |D_upd| <= 2N (Eq. 15).
    assert d_upd == n + len(set(tree.fork_points))
    assert n + 1 <= d_upd <= 2 * n
    if len(set(tree.fork_points)) == n:  # every fork landed on a state without siblings
        assert d_upd == 2 * n
    assert compute_tree_stats(s.arrays, s)["carl/actions_trained_per_tree"] == d_upd


def test_real_count_is_reported_beyond_eq15_for_carl():
    # N0 = 8: the root starts with 8 children, all critical, so |D_upd| can exceed 2N; stats report the real count.
    rng = random.Random(3)
    config = CARLConfig(n0=8, n_forks=2, max_actions=4)
    tree = random_tree(rng, config, p_stop=0.1)
    s = score_trees([tree], config)
    real = sum(len(n.children) for n in tree.nodes if len(n.children) > 1)
    assert int(s.trained.sum()) == real >= 8
    assert compute_tree_stats(s.arrays, s)["carl/actions_trained_per_tree"] == real


@pytest.mark.parametrize("seed", range(10))
def test_observation_tokens_change_no_advantage(seed):
    rng = random.Random(seed)
    config = CARLConfig(n0=2, n_forks=6, max_actions=4)
    tree = random_tree(rng, config)
    other = copy.deepcopy(tree)
    for node in other.nodes[1:]:
        node.action.observation_ids = [7] * rng.randint(0, 9)
    a, b = score_trees([tree], config), score_trees([other], config)
    assert torch.equal(a.advantage, b.advantage) and torch.equal(a.trained, b.trained)
