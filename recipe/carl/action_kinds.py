"""Metrics by action kind (search, access, read, answer, invalid): where a step's actions, trained actions, forks and
credit went, the paper's Fig. 5 in training (its criticality study finds search and access more critical than read
and answer).

The kinds reach the trainer as generic data: every node's `Action.info["kind"]`, in each tree's description
(`describe_tree(info_keys=("kind", ...))`, written by the agent loop); `carl_core` knows nothing of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from carl_core import TreeArrays


def node_kinds(descriptions: Sequence[dict[str, Any]]) -> list[str | None]:
    """Every node's action kind, tree after tree (None at roots and in descriptions without kinds)."""
    out: list[str | None] = []
    for d in descriptions:
        kinds = d.get("kind") or [None] * len(d["parent"])
        out += [None if k is None else str(k) for k in kinds]
    return out


def action_kind_stats(
    arrays: TreeArrays,
    kinds: Sequence[str | None],
    trained: torch.Tensor,
    questions: int,
    advantage: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per action kind k: `carl/kind_generated/<k>` and `carl/kind_trained/<k>` (actions per question; a merged action
    counts its samples when generated, once when trained), `carl/kind_fork_share/<k>` (the share of the step's fork
    points at states whose first action was of kind k: where the fork rule sent the samples) and
    `carl/kind_advantage_abs/<k>` (mean |A| of its trained actions).

    Args:
        arrays: the step's trees.
        kinds: each node's action kind [len: num_nodes].
        trained: whether each node's entering action is trained [shape: (num_nodes,)].
        questions: distinct questions of the step.
        advantage: each node's edge advantage (CARL); None under a baseline (its advantages are per token).
    """
    if len(kinds) != len(arrays.parent):
        raise ValueError(f"need one kind per node, got {len(kinds)} for {len(arrays.parent)} nodes.")
    parent = arrays.parent
    is_action = parent >= 0
    ids = torch.arange(len(parent))
    # The first action sampled at each state (its lowest child id): the state's kind for the fork share.
    first = torch.full((len(parent),), len(parent), dtype=torch.long)
    first = first.scatter_reduce(0, parent[is_action], ids[is_action], "amin")
    forks = float(arrays.forked.sum())
    questions = max(questions, 1)
    stats: dict[str, float] = {}
    for kind in sorted({k for k in kinds if k is not None}):
        mask = torch.tensor([k == kind for k in kinds]) & is_action
        stats[f"carl/kind_generated/{kind}"] = float(arrays.count[mask].sum()) / questions
        stats[f"carl/kind_trained/{kind}"] = float((trained & mask).sum()) / questions
        if forks > 0:
            states = (first < len(parent)) & mask[first.clamp(max=len(parent) - 1)]
            stats[f"carl/kind_fork_share/{kind}"] = float(arrays.forked[states].sum()) / forks
        if advantage is not None and bool((trained & mask).any()):
            value = float(advantage[trained & mask].abs().mean())
            if not math.isnan(value):
                stats[f"carl/kind_advantage_abs/{kind}"] = value
    return stats
