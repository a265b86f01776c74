"""Node values and edge advantages (Alg. 2, Eqs. 9-11) on hand-built trees, values derived by hand."""

import pytest
import torch

from carl_core import CARLConfig, compute_edge_advantages, compute_node_values, pack_trees, score_trees

from .conftest import build_tree


def test_five_node_tree_by_hand():
    #   0 ─> 1 ─> 3 (R=1)      V3 = 1, V4 = 0, V1 = (1 + 0) / 2 = 0.5
    #        1 ─> 4 (R=0)      V2 = 1
    #   0 ─> 2 (R=1)           V0 = (V1 + V2) / 2 = 0.75
    tree = build_tree([(0, [-1.0], None), (0, [-1.0], 1.0), (1, [-1.0], 1.0), (1, [-1.0], 0.0)])
    a = pack_trees([tree])
    v = compute_node_values(a.parent, a.reward, a.is_leaf, a.depth)
    assert v.tolist() == pytest.approx([0.75, 0.5, 1.0, 1.0, 0.0])
    # A(0->1) = 0.5 - 0.75, A(0->2) = 1 - 0.75, A(1->3) = 1 - 0.5, A(1->4) = 0 - 0.5; root has no entering action.
    adv = compute_edge_advantages(a.parent, v)
    assert adv.tolist() == pytest.approx([0.0, -0.25, 0.25, 0.5, -0.5])
    # TreeRL's leaf weighting: V0 = mean(1, 0, 1) = 2/3 instead of 0.75 (node 1 has two leaves, node 2 one).
    vw = compute_node_values(a.parent, a.reward, a.is_leaf, a.depth, "leaf_weighted")
    assert vw.tolist() == pytest.approx([2 / 3, 0.5, 1.0, 1.0, 0.0])


def test_fig_tree_by_hand(fig_tree):
    # V3 = 1, V2 = V3 = 1 (one child), V5 = V4 = 0, V1 = (1 + 0) / 2 = 0.5, V6 = 1, V0 = (0.5 + 1) / 2 = 0.75.
    s = score_trees([fig_tree], CARLConfig())
    assert s.node_value.tolist() == pytest.approx([0.75, 0.5, 1.0, 1.0, 0.0, 0.0, 1.0])
    # A(0->1) = -0.25, A(1->2) = 0.5, A(2->3) = 0, A(1->4) = -0.5, A(4->5) = 0, A(0->6) = 0.25.
    assert s.edge_advantage.tolist() == pytest.approx([0.0, -0.25, 0.5, 0.0, -0.5, 0.0, 0.25])


def test_single_leaf_tree_and_all_equal_rewards_give_zero_advantages():
    lone = build_tree([(0, [-0.3], 0.7)])
    same = build_tree([(0, [-1.0], None), (1, [-1.0], 0.4), (1, [-1.0], 0.4), (0, [-1.0], 0.4)])
    s = score_trees([lone, same], CARLConfig())
    assert s.node_value.tolist() == pytest.approx([0.7, 0.7, 0.4, 0.4, 0.4, 0.4, 0.4])
    assert torch.all(s.edge_advantage == 0) and not torch.isnan(s.advantage).any()


def test_batch_of_trees_equals_trees_one_by_one(fig_tree):
    other = build_tree([(0, [-1.0], 0.0), (0, [-2.0], 1.0)])
    both = score_trees([fig_tree, other], CARLConfig())
    alone = [score_trees([t], CARLConfig()) for t in (fig_tree, other)]
    assert both.node_value.tolist() == pytest.approx(alone[0].node_value.tolist() + alone[1].node_value.tolist())
    assert both.arrays.offsets == [0, 7]


def test_unexpanded_inner_node_is_an_error():
    parent = torch.tensor([-1, 0, 0])
    with pytest.raises(ValueError, match="neither a leaf nor expanded"):
        compute_node_values(parent, torch.zeros(3), torch.tensor([False, True, False]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="aggregation"):
        compute_node_values(parent, torch.zeros(3), torch.tensor([False, True, True]), torch.tensor([0, 1, 1]), "max")
