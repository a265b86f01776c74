"""`recipe.carl.trainer`: where a group baseline's signal goes, and the GRPO fork pool's advantages, against hand
counts."""

import pytest
import torch

from carl_core import describe_tree, layout_rows
from recipe.carl.estimator import carl_batch_from_rows
from recipe.carl.trainer import baseline_signal_stats, pooled_grpo_advantages
from tests.core.conftest import build_tree


def chain(uid: str, actions: int, reward: float, finish: str = "answer"):
    """One GRPO chain: `actions` actions in a row, the last one terminal with `reward` (or ended by `finish`)."""
    tree = build_tree([(i, [-0.5], None) for i in range(actions - 1)], uid=uid)
    leaf = tree.add_action(actions - 1, [7], [-0.5], [], done=True, finish_reason=finish)
    tree.set_reward(leaf, reward)
    return tree


def pooled_group(uid: str, chains: list[tuple[int, float]]):
    """One question's group from the GRPO fork pool: one tree, each chain (actions, reward) a path from the root."""
    edges = []
    for actions, reward in chains:
        for i in range(actions):
            edges.append((0 if i == 0 else len(edges), [-0.5], reward if i == actions - 1 else None))
    return build_tree(edges, uid=uid)


def batch_of(groups: dict[str, list]):
    extras, uids = [], []
    for question, trees in groups.items():
        for tree in trees:
            for i, row in enumerate(layout_rows(tree, [True] * len(tree.nodes))):  # one row per chain
                extras.append({"carl_tree_id": tree.uid, "carl_token_nodes": row.token_nodes, "carl_leaf": row.leaf,
                               "carl_tree": describe_tree(tree) if i == 0 else None})  # fmt: skip
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


def test_a_pooled_group_is_one_tree_of_chains_counted_chain_by_chain():
    # q0: chains of 2, 1 and 1 actions with rewards 0.1, 0.6, 1.1 (mean 0.6: the middle chain's one action at 0);
    # q1: two chains of 0.1 (no signal, 2 + 3 actions at 0). The same numbers as the chains one session each.
    pooled = batch_of({"q0": [pooled_group("a", [(2, 0.1), (1, 0.6), (1, 1.1)])],
                       "q1": [pooled_group("b", [(2, 0.1), (3, 0.1)])]})  # fmt: skip
    wanted = {"carl/no_signal_group_fraction": 1 / 2, "carl/zero_advantage_fraction": pytest.approx((1 + 5) / (4 + 5))}
    assert baseline_signal_stats(pooled) == wanted
    apart = batch_of({"q0": [chain("a", 2, 0.1), chain("b", 1, 0.6), chain("c", 1, 1.1)],
                      "q1": [chain("d", 2, 0.1), chain("e", 3, 0.1)]})  # fmt: skip
    assert baseline_signal_stats(apart) == wanted


def test_the_grpo_pools_advantages_group_a_sessions_chains_by_question():
    # One session per question holds its whole group. GRPO by hand: q0's rewards 0.1, 0.6, 1.1 have mean 0.6 and
    # (unbiased) std 0.5, so A = (r - 0.6) / (0.5 + 1e-6) = -1, 0, +1 on every token of each chain's own row; q1's
    # two equal rewards give A = 0; each row's score is its own leaf's reward on its last token (verl copied the
    # last row's).
    batch = batch_of({"q0": [pooled_group("a", [(2, 0.1), (1, 0.6), (1, 1.1)])],
                      "q1": [pooled_group("b", [(2, 0.1), (3, 0.1)])]})  # fmt: skip
    uids = ["q0"] * 3 + ["q1"] * 2
    mask = torch.zeros(5, 64)
    for i, length in enumerate(batch.row_length):
        mask[i, :length] = 1
    advantages, returns, scores = pooled_grpo_advantages(batch, mask, uids)
    per_row = [advantages[i, 0].item() for i in range(5)]
    assert per_row == pytest.approx([-0.5 / (0.5 + 1e-6), 0.0, 0.5 / (0.5 + 1e-6), 0.0, 0.0], abs=1e-5)
    assert torch.equal(advantages * (1 - mask), torch.zeros_like(mask)) and torch.equal(returns, advantages)
    rewards = [scores[i, batch.row_length[i] - 1].item() for i in range(5)]
    assert rewards == pytest.approx([0.1, 0.6, 1.1, 0.1, 0.1]) and scores.sum().item() == pytest.approx(2.0)
