"""Telemetry of a batch of scored trees, and the dump record of each tree.

Dump record, one JSON object per tree: `{"uid", "question", "n0", "n_forks", "update_set", "value_aggregation",
"nodes": [{"id", "parent", "depth", "entropy", "action_entropy", "num_children", "value", "advantage", "trained",
"reward", "finish_reason", "num_action_tokens", "forked", "text"}]}`. `advantage`, `trained`, `action_entropy`,
`num_action_tokens` and `text` describe the action that *enters* the node; `entropy` is the state's h_hat (null on
leaves); `reward` is set on leaves only; `forked` counts how often the state was handed out as a fork point.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from carl_core.config import CARLConfig
from carl_core.entropy import compute_state_entropy
from carl_core.tree import TreeArrays
from carl_core.update_set import ScoredTrees


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def compute_budget_stats(arrays: TreeArrays, trained: torch.Tensor, questions: Sequence[str]) -> dict[str, float]:
    """What a batch cost and trained, per question (Table 2's |D_roll| and |D_upd|), for any estimator.

    Args:
        arrays: the batch's trees; a GRPO group is `rollout.n` one-leaf trees of the same question.
        trained: whether each node's entering action is in the update set [shape: (num_nodes,)].
        questions: the question (verl `uid`) each tree belongs to [len: num_trees].

    Returns:
        `carl/questions`, `carl/actions_generated_per_question`, `carl/actions_trained_per_question`, and the
        step's totals `carl/tokens_generated`, `carl/tokens_trained` (action tokens; observations are not generated
        by the policy).
    """
    if len(questions) != arrays.num_trees:
        raise ValueError(f"need one question per tree, got {len(questions)} for {arrays.num_trees} trees.")
    is_action = arrays.parent >= 0
    num_questions = max(len(set(questions)), 1)
    return {
        "carl/questions": float(len(set(questions))),
        "carl/actions_generated_per_question": float(is_action.sum()) / num_questions,
        "carl/actions_trained_per_question": float((trained & is_action).sum()) / num_questions,
        "carl/tokens_generated": float(arrays.num_tokens.sum()),
        "carl/tokens_trained": float(arrays.num_tokens[trained].sum()),
    }


def compute_tree_stats(arrays: TreeArrays, scored: ScoredTrees) -> dict[str, float]:
    """Per-batch statistics, keyed for verl's tracker under `carl/`.

    Returns:
        actions generated |D_roll| and trained |D_upd| per tree, leaves per tree, mean depth of fork points, mean
        state entropy at fork points vs at other expanded states, share of generated action tokens trained, the
        share of trees whose leaves all have the same reward (no signal: every advantage is 0), the share of trained
        actions with advantage exactly 0, aborted rollouts, root value, and counts of leaves per finish reason.
    """
    h_hat, n_hat = compute_state_entropy(arrays.parent, arrays.action_entropy)
    num_trees = max(arrays.num_trees, 1)
    expanded = (n_hat > 0) & ~arrays.is_leaf
    at_fork = expanded & (arrays.forked > 0)
    leaf_reward, leaf_tree = arrays.reward[arrays.is_leaf], arrays.tree_index[arrays.is_leaf]
    low = torch.full((num_trees,), math.inf, dtype=leaf_reward.dtype).scatter_reduce(0, leaf_tree, leaf_reward, "amin")
    high = torch.full((num_trees,), -math.inf, dtype=leaf_reward.dtype).scatter_reduce(
        0, leaf_tree, leaf_reward, "amax"
    )
    trained_adv = scored.advantage[scored.trained]
    tokens = float(arrays.num_tokens.sum())
    stats = {
        "carl/trees": float(arrays.num_trees),
        "carl/actions_generated_per_tree": float((arrays.parent >= 0).sum()) / num_trees,
        "carl/actions_trained_per_tree": float(scored.trained.sum()) / num_trees,
        "carl/leaves_per_tree": float(arrays.is_leaf.sum()) / num_trees,
        "carl/fork_depth_mean": float((arrays.depth * arrays.forked).sum() / arrays.forked.sum())
        if bool(arrays.forked.any())
        else math.nan,
        "carl/entropy_at_forks": _mean(h_hat[at_fork].tolist()),
        "carl/entropy_elsewhere": _mean(h_hat[expanded & ~at_fork].tolist()),
        "carl/trained_token_fraction": float(arrays.num_tokens[scored.trained].sum()) / tokens if tokens else 0.0,
        "carl/degenerate_tree_fraction": float((low == high).sum()) / num_trees,
        "carl/zero_advantage_fraction": float((trained_adv == 0).sum()) / trained_adv.numel()
        if trained_adv.numel()
        else math.nan,
        "carl/aborted_rollouts": float(arrays.aborted),
        "carl/root_value_mean": float(scored.node_value[arrays.parent < 0].mean()),
        "carl/leaf_reward_mean": float(leaf_reward.mean()),
        "carl/advantage_abs_mean": float(trained_adv.abs().mean()) if trained_adv.numel() else 0.0,
    }
    reasons = Counter(f or "done" for f, leaf in zip(arrays.finish, arrays.is_leaf.tolist(), strict=True) if leaf)
    stats.update({f"carl/finish/{reason}": float(count) for reason, count in sorted(reasons.items())})
    # Undefined means (e.g. no state outside the fork points) are left out rather than logged as NaN.
    return {key: value for key, value in stats.items() if not math.isnan(value)}


def tree_records(
    arrays: TreeArrays, scored: ScoredTrees, config: CARLConfig, descriptions: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One dump record per tree (format in the module docstring) from the batch, its scores and the descriptions it
    was packed from (their `question` and per-node `text`, where present, are copied)."""
    h_hat, n_hat = compute_state_entropy(arrays.parent, arrays.action_entropy)
    columns = {
        "value": scored.node_value.tolist(),
        "advantage": scored.advantage.tolist(),
        "trained": scored.trained.tolist(),
        "entropy": [None if math.isnan(h) else h for h in h_hat.tolist()],
        "num_children": n_hat.tolist(),
        "depth": arrays.depth.tolist(),
        "forked": arrays.forked.tolist(),
    }
    records = []
    for b, d in enumerate(descriptions):
        base = arrays.offsets[b]
        nodes = []
        for i, parent in enumerate(d["parent"]):
            g = base + i
            nodes.append(
                {
                    "id": i,
                    "parent": None if parent < 0 else parent,
                    **{key: values[g] for key, values in columns.items()},
                    "action_entropy": d["entropy"][i],
                    "reward": d["reward"][i],
                    "finish_reason": d["finish"][i],
                    "num_action_tokens": d["tokens"][i],
                    "text": (d.get("text") or [None] * len(d["parent"]))[i],
                }
            )
        records.append(
            {
                "uid": d["uid"],
                "question": d.get("question"),
                "n0": config.n0,
                "n_forks": config.n_forks,
                "update_set": config.update_set,
                "value_aggregation": config.value_aggregation,
                "nodes": nodes,
            }
        )
    return records
