"""Node values and edge advantages (Alg. 2, Eqs. 9-11).

Values are backed up bottom-up: a leaf's value is its outcome reward, an inner node's value is the plain mean of its
children's values. The edge advantage is the value difference across the edge; there is no critic, no group mean and
no std normalisation. Along any root-to-leaf path the advantages telescope to R(leaf) - V(root). Two extensions keep
V the mean over *sampled* actions: an action sampled m times and merged into one child (`RolloutTree(merge=True)`)
counts m times; a sample whose rollout the environment ended (`tool_error`) is no sample of the policy's outcome, so it
counts nowhere (its leaf has no value, the actions on its way weigh `count - lost`), and a subtree without any valued
leaf has no value. A rollout the policy ended without an action (a stop) is an outcome like any other.

Why the plain mean (the paper's App. A.1): each child of u is a sample a ~ pi(.|u), so averaging the children's
(unbiased) values gives an unbiased estimate of E[R | u] whatever the sizes of the subtrees below them. TreeRL's
leaf-count weighting (`leaf_weighted`) averages all leaves under u instead, which over-weights children that happened
to be forked more often; it is kept only for comparison and is biased whenever the subtree size depends on the
action (e.g. forks are drawn to high-entropy states).
"""

from __future__ import annotations

import math

import torch


def depth_levels(depth: torch.Tensor) -> list[torch.Tensor]:
    """Node ids grouped by depth, deepest first [each shape: (nodes_at_depth,)]."""
    order = torch.argsort(depth, descending=True, stable=True)
    counts = torch.bincount(depth, minlength=int(depth.max()) + 1).flip(0)
    return [lvl for lvl in torch.split(order, counts.tolist()) if lvl.numel()]


def compute_node_values(
    parent: torch.Tensor,
    leaf_reward: torch.Tensor,
    is_leaf: torch.Tensor,
    depth: torch.Tensor,
    aggregation: str = "mean",
    *,
    count: torch.Tensor | None = None,
    has_outcome: torch.Tensor | None = None,
) -> torch.Tensor:
    """V(u) for every node of a batch of trees.

    Math (Alg. 2, Eqs. 9-10), over the children c of u that have a value, c sampled m_c times:
        V(leaf) = R(leaf)                                      (a leaf without outcome has no value)
        V(u)    = sum_c m_c * V(c) / sum_c m_c                 (aggregation="mean": the mean over sampled actions)
        V(u)    = mean of R over the leaves below u, each counted m times   (aggregation="leaf_weighted", TreeRL)
        A node with no valued child has no value (NaN).

    Args:
        parent: parent id of each node, -1 for roots [shape: (num_nodes,)].
        leaf_reward: outcome reward on leaves, ignored elsewhere [shape: (num_nodes,)].
        is_leaf: True on terminal nodes [shape: (num_nodes,)].
        depth: actions between the root and each node [shape: (num_nodes,)].
        aggregation: "mean" (the paper) or "leaf_weighted".
        count: m, how often each node's entering action was sampled with an outcome (`TreeArrays.weight`); None =
            once each [shape: (num_nodes,)].
        has_outcome: leaves whose reward counts; None = every leaf (`TreeArrays.has_outcome`) [shape: (num_nodes,)].

    Returns:
        Node values [shape: (num_nodes,)], in the dtype of `leaf_reward`; NaN where there is no value.
    """
    n, dtype, has_parent = parent.numel(), leaf_reward.dtype, parent >= 0
    broken = (torch.bincount(parent[has_parent], minlength=n) == 0) != is_leaf
    if bool(broken.any()):
        bad = int(torch.nonzero(broken)[0])
        what = "leaf has children" if is_leaf[bad] else "is neither a leaf nor expanded"
        raise ValueError(f"node {bad} {what}: every trajectory must end in a leaf, and leaves are terminal states.")
    if aggregation not in ("mean", "leaf_weighted"):
        raise ValueError(f"aggregation={aggregation!r} is unknown: use 'mean' or 'leaf_weighted'.")
    m = torch.ones(n, dtype=dtype) if count is None else count.to(dtype)
    valued = is_leaf if has_outcome is None else is_leaf & has_outcome
    if bool((valued & ~torch.isfinite(leaf_reward)).any()):
        raise ValueError(f"leaf {int(torch.nonzero(valued & ~torch.isfinite(leaf_reward))[0])}: non-finite reward.")
    # Step 1: valued leaves hold R; the sums below collect each node's weighted children (or leaves) and weights.
    value = torch.where(valued, leaf_reward, torch.full_like(leaf_reward, math.nan))
    total, weight, lo, hi = (torch.full((n,), x, dtype=dtype) for x in (0.0, 0.0, math.inf, -math.inf))
    leaf_sum, leaf_weight = torch.where(valued, m * leaf_reward, 0.0), torch.where(valued, m, 0.0)
    # Step 2: deepest level first; all children of u sit one level below u, so a level's inner nodes are complete.
    num, den = (total, weight) if aggregation == "mean" else (leaf_sum, leaf_weight)
    for level in depth_levels(depth):
        inner = level[~is_leaf[level]]
        # A mean of the children lies in [min, max] of them: the clamp undoes rounding (equal outcomes: A = 0 exactly)
        value[inner] = torch.where(den[inner] > 0, (num[inner] / den[inner]).clamp(lo[inner], hi[inner]), math.nan)
        kids = level[has_parent[level]]
        ok = kids[~torch.isnan(value[kids])]
        lo.scatter_reduce_(0, parent[ok], value[ok], "amin"), hi.scatter_reduce_(0, parent[ok], value[ok], "amax")
        total.index_add_(0, parent[ok], m[ok] * value[ok])
        weight.index_add_(0, parent[ok], m[ok])
        leaf_sum.index_add_(0, parent[kids], leaf_sum[kids])
        leaf_weight.index_add_(0, parent[kids], leaf_weight[kids])
    return value


def compute_has_value(
    parent: torch.Tensor, has_outcome: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Nodes that are, or lie above through children of positive weight, a leaf with an outcome: those
    `compute_node_values` gives a value [shape: (num_nodes,)]. Structural (finish reasons and counts, no rewards):
    the agent loop lays rows out before any value exists.

    Args:
        parent: parent id of each node, -1 for roots [shape: (num_nodes,)].
        has_outcome: leaves whose reward counts (`TreeArrays.has_outcome`) [shape: (num_nodes,)].
        weight: samples with an outcome (`TreeArrays.weight`); None = every node counts [shape: (num_nodes,)].
    """
    out, has_parent = has_outcome.clone(), parent >= 0 if weight is None else (parent >= 0) & (weight > 0)
    while True:  # one level up per pass: at most depth + 1 passes
        up = out.clone()
        up[parent[has_parent & out]] = True
        if torch.equal(up, out):
            return out
        out = up


def compute_edge_advantages(parent: torch.Tensor, node_value: torch.Tensor) -> torch.Tensor:
    """A(u -> v) for the action entering every node.

    Math (Eq. 11):
        A(e = (u, v)) = V(v) - V(u)        (no normalisation)

    Args:
        parent: parent id of each node, -1 for roots [shape: (num_nodes,)].
        node_value: V of each node [shape: (num_nodes,)].

    Returns:
        Advantage of the action entering each node, 0 at roots [shape: (num_nodes,)].
    """
    has_parent = parent >= 0
    parent_value = node_value[parent.clamp(min=0)]
    return torch.where(has_parent, node_value - parent_value, torch.zeros_like(node_value))
