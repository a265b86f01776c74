"""The rollout tree: growing, JSON round trip, and bad input named clearly."""

import json
import math

import pytest

from carl_core import CARLConfig, CARLConfigError, RolloutTree, TreeError, pack_trees

from .conftest import build_tree


def test_prefix_path_and_state_entropy(fig_tree):
    assert fig_tree.path(5) == [0, 1, 4, 5]
    assert fig_tree.prefix_ids(4) == [1, 2, 3, 100, 101, 901, 951, 400, 401, 904, 954]
    # State 1 has children 2 and 4, each with log-probs (-0.5, -1.0): h = 0.75 each.
    assert fig_tree.state_entropy(1) == (pytest.approx(0.75), 2)
    assert fig_tree.leaves() == [3, 5, 6]


def test_json_round_trip(fig_tree):
    fig_tree.fork_points = [1, 0]
    data = json.loads(json.dumps(fig_tree.to_dict()))
    back = RolloutTree.from_dict(data)
    assert back.to_dict() == fig_tree.to_dict()
    a, b = pack_trees([fig_tree]), pack_trees([back])
    assert a.parent.tolist() == b.parent.tolist() and a.reward.tolist() == b.reward.tolist()


def test_tree_without_leaves_is_named():
    tree = RolloutTree([1], 4)
    with pytest.raises(TreeError, match="neither terminal nor expanded|no leaves"):
        tree.validate()


def test_reward_on_inner_node_is_refused(fig_tree):
    with pytest.raises(TreeError, match="inner node 1"):
        fig_tree.set_reward(1, 1.0)
    data = fig_tree.to_dict()
    data["nodes"][1]["reward"] = 0.5
    with pytest.raises(TreeError, match="inner node 1 carries reward"):
        RolloutTree.from_dict(data)


@pytest.mark.parametrize("lps", [[float("nan")], [float("inf")], [0.5]])
def test_bad_log_probs_are_refused(lps):
    with pytest.raises(TreeError, match="invalid log-probs"):
        RolloutTree([1], 4).add_action(0, [5], lps)


def test_empty_action_and_length_mismatch_are_refused():
    tree = RolloutTree([1], 4)
    with pytest.raises(TreeError, match="empty action at node 0"):
        tree.add_action(0, [], [])
    with pytest.raises(TreeError, match="2 tokens but 1 log-probs"):
        tree.add_action(0, [5, 6], [-1.0])
    data = build_tree([(0, [-1.0], 1.0)]).to_dict()
    data["nodes"][1]["action"]["token_ids"] = []
    data["nodes"][1]["action"]["log_probs"] = []
    with pytest.raises(TreeError, match="empty action"):
        RolloutTree.from_dict(data)


def test_cycle_is_named(fig_tree):
    data = fig_tree.to_dict()
    data["nodes"][1]["parent"] = 2  # 1 -> 2 -> 1
    with pytest.raises(TreeError, match="cycle"):
        RolloutTree.from_dict(data)


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
    with pytest.raises(CARLConfigError, match="wave_size"):
        CARLConfig(wave_size=0)
    assert CARLConfig.from_dict({"n0": 8}).num_leaves == 24
