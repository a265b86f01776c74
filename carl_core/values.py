"""Node values and edge advantages (Alg. 2, Eqs. 9-11).

Values are backed up bottom-up: a leaf's value is its outcome reward, an inner node's value is the plain mean of its
children's values. The edge advantage is the value difference across the edge; there is no critic, no group mean and
no std normalisation. Along any root-to-leaf path the advantages telescope to R(leaf) - V(root).

Why the plain mean (the paper's App. A.1): each child of u is a sample a ~ pi(.|u), so averaging the children's
(unbiased) values gives an unbiased estimate of E[R | u] whatever the sizes of the subtrees below them. TreeRL's
leaf-count weighting (`leaf_weighted`) averages all leaves under u instead, which over-weights children that happened
to be forked more often; it is kept only for comparison and is biased whenever the subtree size depends on the
action (e.g. forks are drawn to high-entropy states).
"""

from __future__ import annotations

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
) -> torch.Tensor:
    """V(u) for every node of a batch of trees.

    Math (Alg. 2, Eqs. 9-10):
        V(leaf) = R(leaf)
        V(u)    = (1/|child(u)|) * sum_{v in child(u)} V(v)                   (aggregation="mean")
        V(u)    = mean of R over the leaves below u                           (aggregation="leaf_weighted", TreeRL)

    Args:
        parent: parent id of each node, -1 for roots [shape: (num_nodes,)].
        leaf_reward: outcome reward on leaves, ignored elsewhere [shape: (num_nodes,)].
        is_leaf: True on terminal nodes [shape: (num_nodes,)].
        depth: actions between the root and each node [shape: (num_nodes,)].
        aggregation: "mean" (the paper) or "leaf_weighted".

    Returns:
        Node values [shape: (num_nodes,)], in the dtype of `leaf_reward`.
    """
    n = parent.numel()
    dtype = leaf_reward.dtype
    has_parent = parent >= 0
    num_children = torch.zeros(n, dtype=dtype).index_add_(
        0, parent[has_parent], torch.ones(int(has_parent.sum()), dtype=dtype)
    )
    if bool(((num_children == 0) & ~is_leaf).any()):
        bad = int(torch.nonzero((num_children == 0) & ~is_leaf)[0])
        raise ValueError(f"node {bad} is neither a leaf nor expanded; every trajectory must end in a leaf.")
    if bool((is_leaf & (num_children > 0)).any()):
        bad = int(torch.nonzero(is_leaf & (num_children > 0))[0])
        raise ValueError(f"leaf {bad} has children; leaves are terminal states.")

    if aggregation == "mean":
        # Step 1: leaves hold R; inner nodes start at 0 and receive V(child)/|child(u)| from each child.
        value = torch.where(is_leaf, leaf_reward, torch.zeros_like(leaf_reward))
        # Step 2: all children of u sit one level below u, so finishing level d completes every node of level d-1.
        for level in depth_levels(depth):
            kids = level[has_parent[level]]
            if kids.numel():
                value.index_add_(0, parent[kids], value[kids] / num_children[parent[kids]])
        return value
    if aggregation == "leaf_weighted":
        leaf_sum = torch.where(is_leaf, leaf_reward, torch.zeros_like(leaf_reward))
        leaf_count = is_leaf.to(dtype)
        for level in depth_levels(depth):
            kids = level[has_parent[level]]
            if kids.numel():
                leaf_sum.index_add_(0, parent[kids], leaf_sum[kids])
                leaf_count.index_add_(0, parent[kids], leaf_count[kids])
        return leaf_sum / leaf_count
    raise ValueError(f"aggregation={aggregation!r} is unknown: use 'mean' or 'leaf_weighted'.")


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
