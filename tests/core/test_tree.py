"""The rollout tree: growing, its compact description, and bad input named clearly."""

import copy
import math

import pytest
import torch

from carl_core import (
    CARLConfig,
    CARLConfigError,
    RolloutTree,
    TreeError,
    compute_state_entropy,
    describe_tree,
    pack_descriptions,
    pack_trees,
)

from .conftest import build_tree
from .support import ended


def test_prefix_path_and_state_entropy(fig_tree):
    assert fig_tree.path(5) == [0, 1, 4, 5]
    assert fig_tree.prefix_ids(4) == [1, 2, 3, 100, 101, 901, 951, 400, 401, 904, 954]
    # State 1 has children 2 and 4, each with log-probs (-0.5, -1.0): h = 0.75 each.
    a = pack_trees([fig_tree])
    h_hat, n_hat = compute_state_entropy(a.parent, a.action_entropy)
    assert (float(h_hat[1]), int(n_hat[1])) == (pytest.approx(0.75), 2)
    assert fig_tree.leaves() == [3, 5, 6]


def test_description_packs_to_the_same_arrays(fig_tree):
    fig_tree.fork_points = [1, 0]
    d = describe_tree(fig_tree)
    assert d["parent"] == [-1, 0, 1, 2, 1, 4, 0]
    assert d["reward"] == [None, None, None, 1.0, None, 0.0, 1.0]
    assert d["tokens"] == [0, 2, 2, 2, 2, 2, 2] and d["finish"][3] == "answer" and d["forks"] == [1, 0]
    a = pack_descriptions([d, d])
    assert a.parent.tolist() == [-1, 0, 1, 2, 1, 4, 0, -1, 7, 8, 9, 8, 11, 7]
    assert a.depth.tolist()[:7] == [0, 1, 2, 3, 2, 3, 1] and a.offsets == [0, 7]
    assert a.forked.tolist()[:7] == [1, 1, 0, 0, 0, 0, 0] and a.tree_index.tolist() == [0] * 7 + [1] * 7
    assert torch.isnan(a.action_entropy[0]) and a.action_entropy[1] == pytest.approx(0.75)


def test_a_broken_description_is_named(fig_tree):
    d = describe_tree(fig_tree)
    with pytest.raises(TreeError, match="tree 't': parents must be -1 for node 0"):
        pack_descriptions([{**d, "parent": [-1, 0, 3, 2, 1, 4, 0]}])
    with pytest.raises(TreeError, match="6 values of 'reward' for 7 nodes"):
        pack_descriptions([{**d, "reward": d["reward"][:6]}])


def test_tree_without_leaves_is_named():
    tree = RolloutTree([1], 4)
    with pytest.raises(TreeError, match="neither terminal nor expanded|no leaves"):
        tree.validate()


def test_reward_on_inner_node_is_refused(fig_tree):
    with pytest.raises(TreeError, match="inner node 1"):
        fig_tree.set_reward(1, 1.0)
    fig_tree.nodes[1].reward = 0.5
    with pytest.raises(TreeError, match="inner node 1 has one"):
        fig_tree.validate()


@pytest.mark.parametrize("lps", [[float("nan")], [float("inf")], [0.5]])
def test_bad_log_probs_are_refused(lps):
    with pytest.raises(TreeError, match="invalid log-probs"):
        RolloutTree([1], 4).add_action(0, [5], lps)


def test_empty_action_and_length_mismatch_are_refused():
    tree = RolloutTree([1], 4)
    with pytest.raises(TreeError, match="empty action at node 0: a rollout that takes no action ends with `stop`"):
        tree.add_action(0, [], [])
    with pytest.raises(TreeError, match="2 tokens but 1 log-probs"):
        tree.add_action(0, [5, 6], [-1.0])
    tree = build_tree([(0, [-1.0], None), (1, [-1.0], 1.0)])
    tree.nodes[1].action.token_ids = []  # an inner node without tokens; only a stop (a leaf) may have none
    with pytest.raises(TreeError, match="empty action: only a stop"):
        tree.validate()
    tree.nodes[1].action.token_ids = [5]
    tree.set_reward(tree.stop(1, "empty_generation"), 0.0)
    tree.validate()
    with pytest.raises(TreeError, match="node 3 is terminal"):
        tree.stop(3, "empty_generation")


def test_cycle_is_named(fig_tree):
    broken = copy.deepcopy(fig_tree)
    broken.nodes[1].parent = 2  # 1 -> 2 -> 1
    with pytest.raises(TreeError, match=r"node 0 lists children \[1, 6\] whose parent links disagree"):
        broken.validate()


def test_no_action_after_a_leaf_and_rewards_must_be_finite(fig_tree):
    with pytest.raises(TreeError, match="node 3 is terminal"):
        fig_tree.add_action(3, [1], [-1.0])
    with pytest.raises(TreeError, match="finite"):
        fig_tree.set_reward(3, math.nan)


def test_config_errors_say_how_to_fix():
    with pytest.raises(CARLConfigError, match="n0=0 and n_forks=0 ask for no rollout"):
        CARLConfig(n0=0, n_forks=0)
    with pytest.raises(CARLConfigError, match="n0=0 must be >= 1"):
        CARLConfig(n0=0, n_forks=4)
    with pytest.raises(CARLConfigError, match="selection='densty' is unknown: use one of density"):
        CARLConfig(selection="densty")
    with pytest.raises(CARLConfigError, match="unknown key.*'nforks'"):
        CARLConfig.from_dict({"nforks": 3})
    with pytest.raises(CARLConfigError, match="forks_in_flight"):
        CARLConfig(forks_in_flight=0)
    with pytest.raises(CARLConfigError, match=r"wave_size=4 was replaced by forks_in_flight.*forks_in_flight=4"):
        CARLConfig.from_dict({"wave_size": 4})
    assert CARLConfig.from_dict({"n0": 8}).num_leaves == 24


# ------------------------------------------------------------------------------------- one node per distinct action
def test_identical_action_joins_its_twin_only_with_merge():
    for merge, expect_nodes in ((True, 3), (False, 4)):
        tree = RolloutTree([1], max_actions=4, merge=merge)
        s1 = tree.add_action(0, [7, 8], [-0.5, -0.5], [9])
        again = tree.add_action(0, [7, 8], [-0.5, -0.5], [9])  # the same tokens and observation
        other = tree.add_action(0, [7, 6], [-0.5, -0.5], [9])
        assert (again == s1) is merge and other not in (s1, again)
        assert len(tree.nodes) == expect_nodes
        assert tree.nodes[s1].count == (2 if merge else 1)


def test_a_twin_is_only_a_twin_with_the_same_observation_and_end():
    tree = RolloutTree([1], max_actions=4, merge=True)
    s1 = tree.add_action(0, [7], [-1.0], [9])
    assert tree.add_action(0, [7], [-1.0], [8]) != s1  # another observation (a tool that answered differently)
    failed = tree.add_action(0, [7], [-1.0], done=True, finish_reason="tool_error")
    assert failed != s1 and tree.add_action(0, [7], [-1.0], done=True, finish_reason="tool_error") == failed
    assert tree.nodes[failed].count == 2 and tree.nodes[s1].count == 1


def test_rollouts_ended_counts_merged_leaves_each_time():
    tree = RolloutTree([1], max_actions=4, merge=True)
    r0, r1 = tree.start_rollout(0), tree.start_rollout(0)
    leaf = tree.add_action(0, [5], [-1.0], done=True, finish_reason="answer", rollout=r0)
    tree.set_reward(leaf, 1.0)
    assert tree.add_action(0, [5], [-1.0], done=True, finish_reason="answer", rollout=r1) == leaf
    tree.end_rollout(r0, leaf)
    assert ended(tree) == 1
    tree.end_rollout(r1, leaf)
    assert ended(tree) == 2 and tree.nodes[leaf].sampled_by == [r0, r1]  # two rollouts ended in the leaf
    with pytest.raises(TreeError, match="rollout 1 cannot end at node 0"):
        tree.end_rollout(r1, 0)
    description = describe_tree(tree)
    assert description["count"] == [1, 2]
    assert pack_descriptions([description]).count.tolist() == [1, 2]
    del description["count"]  # an older description: every action once
    assert pack_descriptions([description]).count.tolist() == [1, 1]


def test_bad_counts_are_named():
    tree = RolloutTree([1], max_actions=4)
    leaf = tree.add_action(0, [5], [-1.0], done=True)
    tree.set_reward(leaf, 0.0)
    tree.nodes[leaf].count = 0
    with pytest.raises(TreeError, match="node 1 has count 0"):
        tree.validate()
