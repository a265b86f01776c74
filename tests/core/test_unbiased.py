"""Unbiasedness of the plain-mean value backup (App. A.1) on a small MDP with a known expected reward.

MDP: at the root two actions, each with probability 1/2. Action "a" leads to state A, where 8 actions are
equally likely and 2 of them win (R = 1, else 0); action "b" leads to state B, one action, R = 1.
E[R] = 1/2 * 2/8 + 1/2 * 1 = 0.625.

Confidence bound: |mean - 0.625| < 4 standard errors of the mean over M independent trees (two-sided p ~ 6e-5).
"""

import math
import random
import statistics

import pytest

from carl_core import CARLConfig, RolloutTree, compute_node_values, pack_trees

from .support import EXPECTED, grow_tree_sync, mdp_reward, mdp_step


def z_score(values):
    return (statistics.fmean(values) - EXPECTED) / (statistics.stdev(values) / math.sqrt(len(values)))


def root_values(trees, aggregation="mean"):
    a = pack_trees(trees)
    v = compute_node_values(a.parent, a.reward, a.is_leaf, a.depth, aggregation, count=a.count)
    return [float(v[o]) for o in a.offsets]


@pytest.mark.parametrize("merge", [False, True])
def test_mean_backup_is_unbiased_when_branching_depends_on_the_state(merge):
    # The paper's setting: children of a state are i.i.d. samples; how many a state gets may depend on the state
    # (here A always gets 5 samples per visit, B one), not on the sampled outcomes. The root gets 2 samples. With
    # merging, identical samples share a node and count once per sample: V(A) is still the mean over A's samples.
    rng = random.Random(0)
    trees = []
    for _ in range(3000):
        tree = RolloutTree([1], 2, merge=merge)
        step = mdp_step(rng)
        for _ in range(2):
            s = step(tree, 0)
            mid = tree.add_action(0, s.token_ids, s.log_probs)
            for _ in range(5 if s.token_ids[0] == 10 else 1):
                c = step(tree, mid)
                leaf = tree.add_action(mid, c.token_ids, c.log_probs, done=True)
                tree.set_reward(leaf, mdp_reward(tree, leaf))
        trees.append(tree)
    assert abs(z_score(root_values(trees, "mean"))) < 4
    # Negative control: TreeRL's leaf weighting over-weights the 5-leaf A subtrees and is far off.
    assert z_score(root_values(trees, "leaf_weighted")) < -10


@pytest.mark.parametrize("merge", [False, True])
def test_planner_trees_with_random_forks_are_unbiased(merge):
    # With `random` selection the tree's shape does not depend on which actions were sampled (A and B are both
    # candidates), so every state's children stay i.i.d. and V(root) is unbiased for E[R].
    rng = random.Random(1)
    config = CARLConfig(n0=1, n_forks=8, selection="random", max_actions=2)
    trees = [
        grow_tree_sync(
            RolloutTree([1], 2, merge=merge), config, mdp_step(rng), mdp_reward, rng=random.Random(rng.random())
        )
        for _ in range(3000)
    ]
    assert abs(z_score(root_values(trees, "mean"))) < 4
