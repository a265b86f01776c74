"""Update sets (Eq. 13 and the ablations) on the hand-built 7-node tree, values derived by hand."""

import math

import pytest
import torch

from carl_core import CARLConfig, compute_trained_mask, score_trees

from .conftest import build_tree

# fig_tree (conftest): V = [0.75, 0.5, 1, 1, 0, 0, 1]; edge advantages into nodes 1..6 = [-0.25, 0.5, 0, -0.5, 0, 0.25].


def test_critical_trains_exactly_the_actions_of_branched_states(fig_tree):
    s = score_trees([fig_tree], CARLConfig(update_set="critical"))
    # Root has children {1, 6}, state 1 has {2, 4}: those four actions are critical; 3 and 5 (single child) are not.
    assert s.trained.tolist() == [False, True, True, False, True, False, True]
    assert s.advantage.tolist() == pytest.approx([0, -0.25, 0.5, 0, -0.5, 0, 0.25])
    # Eq. 15 with N = 2 forks, each landing on a state that had one child: |D_upd| = 2N = 4.
    assert int(s.trained.sum()) == 4


def test_all_inherit_copies_the_preceding_advantage(fig_tree):
    s = score_trees([fig_tree], CARLConfig(update_set="all_inherit"))
    # a3 follows a2 (A = 0.5) and a5 follows a4 (A = -0.5); every action is trained.
    assert s.advantage.tolist() == pytest.approx([0, -0.25, 0.5, 0.5, -0.5, -0.5, 0.25])
    assert s.trained.tolist() == [False] + [True] * 6


def test_all_inherit_first_action_without_siblings_gets_zero():
    # 0 -> 1 -> {2 (R=1), 3 (R=0)}: the root has one child, so a1 is non-critical with no predecessor.
    tree = build_tree([(0, [-1.0], None), (1, [-1.0], 1.0), (1, [-1.0], 0.0)])
    s = score_trees([tree], CARLConfig(update_set="all_inherit"))
    assert s.advantage.tolist() == pytest.approx([0, 0, 0.5, -0.5])


def test_all_trains_everything_with_its_own_advantage(fig_tree):
    s = score_trees([fig_tree], CARLConfig(update_set="all"))
    assert s.advantage.tolist() == pytest.approx([0, -0.25, 0.5, 0, -0.5, 0, 0.25])
    assert s.trained.tolist() == [False] + [True] * 6


def test_outcome_only_is_summed_grpo_z_over_leaf_paths(fig_tree):
    s = score_trees([fig_tree], CARLConfig(update_set="outcome_only"))
    # Leaves 3, 5, 6 with R = 1, 0, 1: mean 2/3, unbiased std sqrt(((1/3)^2 + (2/3)^2 + (1/3)^2) / 2) = sqrt(1/3).
    std = math.sqrt(1 / 3)
    z_hi, z_lo = (1 / 3) / (std + 1e-6), (-2 / 3) / (std + 1e-6)
    # a1 is on the paths to leaves 3 and 5 (z_hi + z_lo); a2, a3 only to 3; a4, a5 only to 5; a6 only to 6.
    assert s.advantage.tolist() == pytest.approx([0, z_hi + z_lo, z_hi, z_hi, z_lo, z_lo, z_hi])
    assert s.trained.tolist() == [False] + [True] * 6


def test_outcome_only_single_leaf_keeps_reward_like_verl_grpo():
    s = score_trees([build_tree([(0, [-1.0], None), (1, [-1.0], 0.3)])], CARLConfig(update_set="outcome_only"))
    assert s.advantage.tolist() == pytest.approx([0, 0.3, 0.3], abs=1e-5)


def test_critical_mask_from_parents_only():
    # Star with three children and one chain: 0 -> {1, 2, 3}, 3 -> 4.
    parent = torch.tensor([-1, 0, 0, 0, 3])
    assert compute_trained_mask(parent, "critical").tolist() == [False, True, True, True, False]
    for ablation in ("all", "all_inherit", "outcome_only"):  # every action is trained; the root never is
        assert compute_trained_mask(parent, ablation).tolist() == [False, True, True, True, True]
    with pytest.raises(ValueError, match="update_set='crit' is unknown"):
        compute_trained_mask(parent, "crit")
