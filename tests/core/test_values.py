"""Node values and edge advantages (Alg. 2, Eqs. 9-11) on hand-built trees, values derived by hand."""

import math

import pytest
import torch

from carl_core import (
    CARLConfig,
    RolloutTree,
    compute_edge_advantages,
    compute_has_value,
    compute_node_values,
    compute_trained_mask,
    pack_trees,
    score_trees,
)

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


# ------------------------------------------------ merged actions (counts) and leaves without outcome, by hand
def merged_tree_with_a_failed_search():
    """Five rollouts, grown with merge=True:

    r1: 0 -a-> 1 -b-> 2 (R=1)          a sampled twice (r1, r3): count 2
    r2: fork at 1 -c-> 3 (R=0)         c sampled twice at 1 (r2, r3): count 2
    r3: fork at 0 -a-> 1 -c-> 3        both samples repeat a twin: no new node
    r4: fork at 0 -d-> 4 (R=0.5)
    r5: fork at 0 -e-> 5 (tool_error, R=0: no outcome)
    """
    tree = RolloutTree([1], max_actions=4, merge=True)

    def leaf(parent, tok, reward, finish="answer"):
        node = tree.add_action(parent, [tok], [-1.0], done=True, finish_reason=finish)
        if tree.nodes[node].reward is None:
            tree.set_reward(node, reward)
        return node

    s1 = tree.add_action(0, [10], [-1.0], [90])
    leaf(s1, 20, 1.0)
    leaf(s1, 30, 0.0)
    assert tree.add_action(0, [10], [-1.0], [90]) == s1
    leaf(s1, 30, 0.0)
    leaf(0, 40, 0.5)
    leaf(0, 50, 0.0, "tool_error")
    return tree


def test_values_weight_merged_children_by_count_and_skip_leaves_without_outcome():
    a = pack_trees([merged_tree_with_a_failed_search()])
    assert a.count.tolist() == [1, 2, 1, 2, 1, 1] and a.has_outcome.tolist() == [0, 0, 1, 1, 1, 0]
    v = compute_node_values(a.parent, a.reward, a.is_leaf, a.depth, count=a.count, has_outcome=a.has_outcome)
    # V1 = (1*1 + 2*0) / 3 = 1/3;  V0 = (2 * 1/3 + 1 * 0.5) / 3 = 7/18 (node 5, the failed search, left out).
    assert v[:5].tolist() == pytest.approx([7 / 18, 1 / 3, 1.0, 0.0, 0.5]) and math.isnan(float(v[5]))
    # Without counts and with the failure counted as 0 (the old backup): V1 = 1/2, V0 = (1/2 + 1/2 + 0) / 3 = 1/3.
    old = compute_node_values(a.parent, a.reward, a.is_leaf, a.depth)
    assert old[:2].tolist() == pytest.approx([1 / 3, 1 / 2])


def test_merged_actions_train_once_with_count_times_their_advantage():
    s = score_trees([merged_tree_with_a_failed_search()], CARLConfig())
    # Root: valued children 1 (a) and 4 (d): critical. A(a) = 2 * (1/3 - 7/18) = -1/9, A(d) = 1 * (1/2 - 7/18) = 1/9.
    # State 1: b and c: A(b) = 1 * (1 - 1/3) = 2/3, A(c) = 2 * (0 - 1/3) = -2/3. The failed search e is not trained.
    assert s.trained.tolist() == [False, True, True, True, True, False]
    assert s.advantage.tolist() == pytest.approx([0.0, -1 / 9, 2 / 3, -2 / 3, 1 / 9, 0.0])
    # The baseline property holds per state over samples: sum of count-weighted advantages is 0.
    assert float(s.advantage[[1, 4]].sum()) == pytest.approx(0) and float(s.advantage[[2, 3]].sum()) == pytest.approx(0)


def test_a_subtree_whose_every_leaf_failed_has_no_value_and_trains_nothing():
    #   0 -a-> 1 -b-> 2 (tool_error)      V1: none (no leaf below has an outcome)
    #          1 -c-> 3 (tool_error)
    #   0 -d-> 4 (R=1), 0 -f-> 5 (R=0)     V0 = (1 + 0) / 2 = 0.5; A(d) = 0.5, A(f) = -0.5
    tree = RolloutTree([1], max_actions=4)
    s1 = tree.add_action(0, [10], [-1.0], [90])
    for tok in (20, 30):
        tree.set_reward(tree.add_action(s1, [tok], [-1.0], done=True, finish_reason="tool_error"), 0.0)
    for tok, reward in ((40, 1.0), (50, 0.0)):
        tree.set_reward(tree.add_action(0, [tok], [-1.0], done=True, finish_reason="answer"), reward)
    s = score_trees([tree], CARLConfig())
    assert s.node_value[[0, 4, 5]].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert torch.isnan(s.node_value[[1, 2, 3]]).all()
    assert s.trained.tolist() == [False, False, False, False, True, True]
    assert s.advantage.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.5, -0.5])
    # The structural mask the agent loop lays rows out with agrees, from finish reasons alone.
    a = s.arrays
    assert compute_has_value(a.parent, a.has_outcome).tolist() == [True, False, False, False, True, True]
    assert compute_trained_mask(a.parent, "critical", compute_has_value(a.parent, a.has_outcome)).equal(s.trained)
    # A tree with no outcome at all: no value anywhere, nothing trained, no NaN on any advantage.
    lone = RolloutTree([1], max_actions=2)
    lone.set_reward(lone.add_action(0, [5], [-1.0], done=True, finish_reason="tool_error:timeout"), 0.0)
    s = score_trees([lone], CARLConfig(update_set="all"))
    assert not s.trained.any() and s.advantage.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("update_set", ["all", "all_inherit", "outcome_only"])
def test_ablation_update_sets_skip_actions_without_value(update_set):
    s = score_trees([merged_tree_with_a_failed_search()], CARLConfig(update_set=update_set))
    assert s.trained.tolist() == [False, True, True, True, True, False]
    assert not torch.isnan(s.advantage).any() and float(s.advantage[5]) == 0.0


def test_outcome_only_weights_each_leaf_by_its_rollouts():
    s = score_trees([merged_tree_with_a_failed_search()], CARLConfig(update_set="outcome_only"))
    # Valued leaves 2 (R=1, once), 3 (R=0, twice), 4 (R=0.5, once): n = 4, mean 0.375,
    # std = sqrt((0.625^2 + 2 * 0.375^2 + 0.125^2) / 3) = sqrt(0.6875 / 3).
    std = math.sqrt(0.6875 / 3)
    z2, z3, z4 = 0.625 / std, -0.375 / std, 0.125 / std
    # A(1) = z2 + 2 z3 (the three rollouts through a), A(2) = z2, A(3) = 2 z3, A(4) = z4.
    assert s.advantage.tolist() == pytest.approx([0.0, z2 + 2 * z3, z2, 2 * z3, z4, 0.0], rel=1e-5)


# ------------------------------------------------ merging on and off give the same values when rollouts fail (#28)
class TableEnvironment:
    """Each (rollout, turn) draw's action from a table: (token, log-prob, done, finish) or None for no action."""

    def __init__(self, table, rewards):
        self.table, self.rewards = table, rewards

    async def step(self, tree, node, draw):
        from carl_core import Step

        entry = self.table[draw.rollout][draw.turn]
        if entry[0] is None:
            return Step((), (), finish_reason=entry[3])
        token, log_prob, done, finish = entry
        return Step([token], [log_prob], () if done else (99,), done, finish)

    async def score(self, tree, leaf):
        actions = tuple(t for n in tree.path(leaf)[1:] for t in tree.nodes[n].action.token_ids)
        return self.rewards[actions]


def root_value(table, rewards, n0, n_forks, merge):
    import asyncio
    import random

    from carl_core import CARLConfig, ForkPlanner, RolloutTree, grow_tree, score_trees

    config = CARLConfig(n0=n0, n_forks=n_forks, max_actions=4, merge=merge)
    tree = asyncio.run(grow_tree(RolloutTree([1], 4, merge=merge), ForkPlanner(config, random.Random(0)),
                                 TableEnvironment(table, rewards)))  # fmt: skip
    return float(score_trees([tree], config).node_value[0]), tree


@pytest.mark.parametrize("merge", [True, False])
def test_a_sample_the_environment_ended_counts_nowhere_merged_or_not(merge):
    # r0: root -a-> s -c-> answer (R 1); r1: root -a-> s -d-> tool_error; r2: root -b-> answer (R 0).
    # r1's sample of a has no outcome: it counts nowhere, so V(root) = mean(1, 0) = 0.5 whether r0's and r1's a are
    # one node (count 2, one of them lost) or two (the second without value). Before issue 28: 0.667 merged.
    a, b, c, d = (
        (1, -0.5, False, None),
        (2, -0.5, True, "answer"),
        (3, -0.1, True, "answer"),
        (4, -0.1, True, "tool_error"),
    )
    table = {0: [a, c], 1: [a, d], 2: [b]}
    value, tree = root_value(table, {(1, 3): 1.0, (1, 4): 0.0, (2,): 0.0}, n0=3, n_forks=0, merge=merge)
    assert value == pytest.approx(0.5)
    if merge:
        (s,) = [n for n in tree.nodes if n.action and n.action.token_ids == [1]]
        assert (s.count, s.lost) == (2, 1)


@pytest.mark.parametrize("merge", [True, False])
def test_a_sample_the_policy_ended_without_an_action_is_an_outcome_merged_or_not(merge):
    # r0: root -x-> s -c-> answer (R 1); r1: root -b-> answer (R 0). The fork (r2) goes to the root (h/n: root
    # (2.0 + 2.0) / 2 / 2 = 1.0 > s's 0.1) and samples x again, then generates nothing at s: an outcome scored R 0.
    # Merged, s holds both samples (V(s) = (1 + 0) / 2, weight 2); unmerged, the second copy of s is a leaf (R 0):
    # V(root) = (1 + 0 + 0) / 3 either way. Before issue 28: 0.667 merged (the empty step was an abort).
    x, b, c = (1, -2.0, False, None), (2, -2.0, True, "answer"), (3, -0.1, True, "answer")
    table = {0: [x, c], 1: [b], 2: [x, (None, 0, False, "empty_generation")]}
    value, tree = root_value(table, {(1, 3): 1.0, (2,): 0.0, (1,): 0.0}, n0=2, n_forks=1, merge=merge)
    assert tree.fork_points == [0]
    assert value == pytest.approx(1 / 3)


@pytest.mark.parametrize("merge", [True, False])
def test_spread_counts_a_sample_without_outcome_nowhere_merged_or_not(merge):
    # The tree of the first test above: root -a-> (c: R 1; d: tool_error), root -b-> R 0. `spread` at the root sees
    # its valued samples only: a (V 1, weight 1: merged, its second sample is lost) and b (V 0): n_v = 2, V(root) =
    # 0.5, sigma_hat = sqrt((1 * 0.25 + 1 * 0.25) / 2) = 0.5, over (R_max - R_min) / 2 = 0.5 gives 1; h~(root) = 1
    # (every root action has h 0.5, s's 0.1): C_hat = (lambda * 1 + 2 * 1) / (lambda + 2) = 1. Counting the lost
    # sample (n_v = 3, V(root) = 2/3) would give sigma~ = 0.943 and, at lambda = 0.5, C_hat = 0.951.
    from carl_core.entropy import compute_state_entropy
    from carl_core.forking import ForkPlanner, compute_outcome_criticality
    from carl_core.tree import pack_trees
    from carl_core.values import compute_node_values

    a, b = (1, -0.5, False, None), (2, -0.5, True, "answer")
    c, d = (3, -0.1, True, "answer"), (4, -0.1, True, "tool_error")
    table = {0: [a, c], 1: [a, d], 2: [b]}
    _, tree = root_value(table, {(1, 3): 1.0, (1, 4): 0.0, (2,): 0.0}, n0=3, n_forks=0, merge=merge)
    arr = pack_trees([tree])
    h_hat, _ = compute_state_entropy(arr.parent, arr.action_entropy, arr.count)
    v = compute_node_values(arr.parent, arr.reward, arr.is_leaf, arr.depth, count=arr.weight,
                            has_outcome=arr.has_outcome)  # fmt: skip
    spread = compute_outcome_criticality(arr.parent, v, arr.weight, h_hat, ForkPlanner.forkable(tree), 0.5)
    assert float(spread[0]) == pytest.approx(1.0)
    if merge:  # what the planner would see if it weighed nodes by count (the lost sample counted)
        v = compute_node_values(arr.parent, arr.reward, arr.is_leaf, arr.depth, count=arr.count,
                                has_outcome=arr.has_outcome)  # fmt: skip
        wrong = compute_outcome_criticality(arr.parent, v, arr.count, h_hat, ForkPlanner.forkable(tree), 0.5)
        assert float(wrong[0]) == pytest.approx((0.5 + 3 * (2 / 9) ** 0.5 / 0.5) / 3.5)
