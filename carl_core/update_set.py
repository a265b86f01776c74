"""Which actions are trained, and with which advantage (Eq. 13 and the paper's ablations #1 and #3).

`critical` (the paper, Eq. 13): D_upd = {(s_t, a_t, A_t) in D_roll : |child(s_t)| > 1}. An edge becomes trainable
once its source state has at least two children, *including the action that was there before the first fork*.
This is the reading under which Eq. 15 holds (N + 1 <= |D_upd| <= 2N for N0 = 1: every fork adds its new edge, and
the first fork at a state also makes the old edge critical). App. C.1's sentence "actions in this [N0] phase are not
included in training" contradicts it; we follow Eq. 15 because it is the one the measured |D_upd| (32.0 = 2N)
agrees with. Non-critical edges are dropped from the loss (no row or response_mask 0), not zero-weighted: a zero
advantage would still count in verl's token-mean denominator and in the KL/entropy terms.

Merged actions (`RolloutTree(merge=True)`): |child(s_t)| counts distinct actions, and a merged action is trained once
with m times its advantage, m = how often it was sampled: the policy gradient's sum (1/n) sum_i A(a_i) grad log
pi(a_i) has one term per *sample*, while unmerged copies of one action would enter the token-mean denominator m times
(and, where N0 root rollouts open alike, cancel with +x and -x on the same tokens). Only children with a value count,
an action whose subtree has no leaf with an outcome (`NO_OUTCOME_FINISH`) is never trained, and m counts only the
samples whose rollout had an outcome (`TreeArrays.weight`). A stop (a rollout that took no action) counts as a child
but has no tokens to train.

The ablations:
- `all_inherit` (#3): every action is trained; a non-critical action takes the advantage of the action before it
  (recursively, so a run of non-critical actions after a fork all take the fork edge's advantage). A non-critical
  first action has no predecessor and gets 0. Note that V(v) = V(u) on a non-critical edge, so its own A is 0.
- `all`: every action is trained with its own edge advantage (non-critical ones with A = 0, still in the loss).
- `outcome_only` (#1): no action-level credit. Each leaf path is a GRPO trajectory with advantage
  z = (R - mean_tree R) / (std_tree R + eps) (verl's GRPO, unbiased std; a single leaf keeps z = R as verl does).
  An action shared by several leaf paths is trained once with the *sum* of their z, which is the policy-gradient
  numerator of training it once per path as GRPO would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from carl_core.config import CARLConfig
from carl_core.tree import RolloutTree, TreeArrays, pack_trees
from carl_core.values import compute_edge_advantages, compute_node_values, depth_levels


def compute_trained_mask(
    parent: torch.Tensor,
    update_set: str = "critical",
    has_value: torch.Tensor | None = None,
    trainable: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which actions are trained (D_upd): structural, it depends on child counts only, never on values.

    Math (Eq. 13, over the children that count: a subtree whose every leaf failed in the environment has no value,
    and a child whose every sample's rollout failed weighs nothing):
        critical:  trained(u -> v) = v counts, has tokens, and |{c in child(u) : c counts}| > 1
        all, all_inherit, outcome_only:  every action that counts and has tokens is trained

    Args:
        parent: parent id of each node, -1 for roots [shape: (num_nodes,)].
        update_set: "critical" | "all_inherit" | "all" | "outcome_only".
        has_value: nodes that count (`compute_has_value` and weight > 0); None = every node [shape: (num_nodes,)].
        trainable: nodes whose action has tokens (a stop has none); None = every node [shape: (num_nodes,)].

    Returns:
        True on nodes whose entering action is trained [shape: (num_nodes,)], False at roots.
    """
    has_parent = parent >= 0 if has_value is None else (parent >= 0) & has_value
    own = has_parent if trainable is None else has_parent & trainable
    if update_set == "critical":
        num_children = torch.bincount(parent[has_parent], minlength=parent.numel())
        return own & (num_children[parent.clamp(min=0)] > 1)
    if update_set in ("all", "all_inherit", "outcome_only"):
        return own
    raise ValueError(f"update_set={update_set!r} is unknown: use critical, all_inherit, all or outcome_only.")


def compute_outcome_advantages(
    parent: torch.Tensor,
    is_leaf: torch.Tensor,
    leaf_reward: torch.Tensor,
    tree_index: torch.Tensor,
    depth: torch.Tensor,
    eps: float = 1e-6,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ablation #1: the summed GRPO-normalised outcome of the leaf paths through each action.

    Math (a leaf reached by m_l rollouts counts m_l times):
        z(l) = (R(l) - mean_{l' in tree} R(l')) / (std_{l' in tree} R(l') + eps)
        A(e -> v) = sum_{leaves l below v (v included)} m_l * z(l)

    Args:
        parent, leaf_reward, tree_index, depth: node-level tensors [shape: (num_nodes,)].
        is_leaf: the leaves whose reward counts (leaves without outcome left out) [shape: (num_nodes,)].
        eps: added to the std, as in verl's GRPO.
        count: m per node; None = once each [shape: (num_nodes,)].

    Returns:
        Advantage of the action entering each node, 0 at roots [shape: (num_nodes,)].
    """
    dtype = leaf_reward.dtype
    num_trees = int(tree_index.max()) + 1
    m = (torch.ones_like(leaf_reward) if count is None else count.to(dtype))[is_leaf]
    leaf_tree, r = tree_index[is_leaf], leaf_reward[is_leaf]
    n = torch.zeros(num_trees, dtype=dtype).index_add_(0, leaf_tree, m)
    mean = torch.zeros(num_trees, dtype=dtype).index_add_(0, leaf_tree, m * r) / n.clamp(min=1)
    sq = torch.zeros(num_trees, dtype=dtype).index_add_(0, leaf_tree, m * (r - mean[leaf_tree]) ** 2)
    std = torch.sqrt(sq / (n - 1).clamp(min=1))
    single = n == 1  # verl's GRPO keeps a lone sample's score as is (mean 0, std 1)
    mean, std = torch.where(single, torch.zeros_like(mean), mean), torch.where(single, torch.ones_like(std), std)
    z = torch.zeros_like(leaf_reward)
    z[is_leaf] = m * (r - mean[leaf_tree]) / (std[leaf_tree] + eps)
    # Sum z over each subtree, deepest level first.
    has_parent = parent >= 0
    for level in depth_levels(depth):
        kids = level[has_parent[level]]
        if kids.numel():
            z.index_add_(0, parent[kids], z[kids])
    return torch.where(has_parent, z, torch.zeros_like(z))


def compute_update_advantages(
    parent: torch.Tensor,
    depth: torch.Tensor,
    node_value: torch.Tensor,
    update_set: str = "critical",
    *,
    is_leaf: torch.Tensor | None = None,
    leaf_reward: torch.Tensor | None = None,
    tree_index: torch.Tensor | None = None,
    eps: float = 1e-6,
    count: torch.Tensor | None = None,
    has_outcome: torch.Tensor | None = None,
    trainable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The advantage each action is trained with (m_v * A(u -> v) for a merged action; `outcome_only` weights its
    leaves instead), and whether it is trained at all.

    Args:
        parent: parent id of each node, -1 for roots [shape: (num_nodes,)].
        depth: depth of each node [shape: (num_nodes,)].
        node_value: V from `compute_node_values` [shape: (num_nodes,)].
        update_set: "critical" | "all_inherit" | "all" | "outcome_only" (see the module docstring).
        is_leaf, leaf_reward, tree_index, eps: needed by "outcome_only" only (eps: GRPO's std epsilon).
        count, has_outcome: as `compute_node_values` (None: each action once; every leaf counts).
        trainable: as `compute_trained_mask` (None: every action has tokens).

    Returns:
        (advantage, trained) for the action entering each node [shapes: (num_nodes,), (num_nodes,)]; roots are
        never trained and untrained actions carry advantage 0.
    """
    has_parent = parent >= 0
    m = torch.ones_like(node_value) if count is None else count.to(node_value.dtype)
    has_value = ~torch.isnan(node_value) & (m > 0)
    trained = compute_trained_mask(parent, update_set, has_value, trainable)
    edge_adv = torch.where(trained, compute_edge_advantages(parent, node_value), 0.0)
    critical = compute_trained_mask(parent, "critical", has_value, trainable)
    if update_set in ("critical", "all"):
        return m * edge_adv, trained
    if update_set == "all_inherit":
        adv = torch.where(critical, edge_adv, torch.zeros_like(edge_adv))
        # Top-down (shallowest level first): a non-critical action copies its predecessor's (final) advantage.
        for level in reversed(depth_levels(depth)):
            inherit = level[has_parent[level] & ~critical[level]]
            if inherit.numel():
                adv[inherit] = adv[parent[inherit]]
        return torch.where(trained, m * adv, 0.0), trained
    if update_set == "outcome_only":
        if is_leaf is None or leaf_reward is None or tree_index is None:
            raise ValueError("update_set='outcome_only' needs is_leaf, leaf_reward and tree_index.")
        valued = is_leaf if has_outcome is None else is_leaf & has_outcome
        adv = compute_outcome_advantages(parent, valued, leaf_reward, tree_index, depth, eps, count)
        return torch.where(trained, adv, 0.0), trained
    raise AssertionError(update_set)  # compute_trained_mask refused any other name


@dataclass
class ScoredTrees:
    """Alg. 2 applied to a batch of trees: node-level results, aligned with `arrays` (global node ids)."""

    arrays: TreeArrays
    node_value: torch.Tensor
    """V(u) [shape: (num_nodes,)]."""
    edge_advantage: torch.Tensor
    """A(parent -> v) = V(v) - V(parent) [shape: (num_nodes,)]."""
    advantage: torch.Tensor
    """Advantage the entering action is trained with under the update set, times how often it was sampled
    [shape: (num_nodes,)]."""
    trained: torch.Tensor
    """Whether the entering action is in D_upd [shape: (num_nodes,)]."""


def score_trees(trees: TreeArrays | Sequence[RolloutTree], config: CARLConfig) -> ScoredTrees:
    """Values, edge advantages and the update set of a batch of finished trees (Alg. 2 + Eq. 13).

    Args:
        trees: the batch as `TreeArrays` (from `pack_descriptions`), or finished `RolloutTree`s (packed here).
        config: `value_aggregation`, `update_set` and `outcome_eps` are used.
    """
    arrays = trees if isinstance(trees, TreeArrays) else pack_trees(trees)
    value = compute_node_values(
        arrays.parent,
        arrays.reward,
        arrays.is_leaf,
        arrays.depth,
        config.value_aggregation,
        count=arrays.weight,
        has_outcome=arrays.has_outcome,
    )
    advantage, trained = compute_update_advantages(
        arrays.parent,
        arrays.depth,
        value,
        config.update_set,
        is_leaf=arrays.is_leaf,
        leaf_reward=arrays.reward,
        tree_index=arrays.tree_index,
        eps=config.outcome_eps,
        count=arrays.weight,
        has_outcome=arrays.has_outcome,
        trainable=arrays.num_tokens > 0,
    )
    return ScoredTrees(arrays, value, compute_edge_advantages(arrays.parent, value), advantage, trained)
