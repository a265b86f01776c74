"""`recipe.carl.trainer.baseline_signal_stats`: where a group baseline's signal goes, against hand counts."""

import pytest
import torch

from carl_core import describe_tree, layout_rows
from recipe.carl.estimator import carl_batch_from_rows
from recipe.carl.trainer import baseline_signal_stats
from tests.core.conftest import build_tree


def chain(uid: str, actions: int, reward: float, finish: str = "answer"):
    """One GRPO chain: `actions` actions in a row, the last one terminal with `reward` (or ended by `finish`)."""
    tree = build_tree([(i, [-0.5], None) for i in range(actions - 1)], uid=uid)
    leaf = tree.add_action(actions - 1, [7], [-0.5], [], done=True, finish_reason=finish)
    tree.set_reward(leaf, reward)
    return tree


def batch_of(groups: dict[str, list]):
    extras, uids = [], []
    for question, trees in groups.items():
        for tree in trees:
            (row,) = layout_rows(tree, [True] * len(tree.nodes))
            extras.append({"carl_tree_id": tree.uid, "carl_token_nodes": row.token_nodes, "carl_leaf": row.leaf,
                           "carl_tree": describe_tree(tree)})  # fmt: skip
            uids.append(question)
    return carl_batch_from_rows(extras, uids, width=64)


def test_groups_without_signal_and_actions_at_the_mean():
    batch = batch_of({
        "q0": [chain("a", 2, 0.1), chain("b", 2, 0.1), chain("c", 2, 0.1)],  # all equal: no signal, 6 actions at 0
        "q1": [chain("d", 2, 0.1), chain("e", 1, 0.6), chain("f", 3, 1.1)],  # mean 0.6: e's one action at 0
        "q2": [chain("g", 4, 0.0, finish="tool_error")],  # no outcome: not a group
    })  # fmt: skip
    stats = baseline_signal_stats(batch)
    assert stats["carl/no_signal_group_fraction"] == pytest.approx(1 / 2)
    assert stats["carl/zero_advantage_fraction"] == pytest.approx((6 + 1) / (6 + 6))


def test_a_group_of_eight_equal_rewards_is_silent_though_verl_leaves_a_residue():
    batch = batch_of({"q": [chain(f"t{i}", 1, 0.1) for i in range(8)]})
    scores = torch.full((8,), 0.1)
    assert ((scores - scores.mean()) / (scores.std() + 1e-6)).abs().min() > 1e-3  # verl's float32 GRPO arithmetic
    assert baseline_signal_stats(batch) == {"carl/no_signal_group_fraction": 1.0, "carl/zero_advantage_fraction": 1.0}


def test_a_lone_chain_is_trained_with_its_reward_as_verl_does():
    stats = baseline_signal_stats(batch_of({"q0": [chain("a", 2, 0.6)], "q1": [chain("b", 1, 0.0)]}))
    assert stats == {"carl/no_signal_group_fraction": 0.5, "carl/zero_advantage_fraction": pytest.approx(1 / 3)}


def test_no_outcome_at_all_logs_nothing():
    assert baseline_signal_stats(batch_of({"q": [chain("t", 2, 0.0, finish="tool_error")]})) == {}
