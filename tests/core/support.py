"""Test-only helpers over carl_core: synchronous tree growth, the dump invariant check, and the old row view.

None of this is used in production; it lives here so that carl_core stays the algorithm alone.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from carl_core import (
    CARLConfig,
    ForkPlanner,
    RolloutTree,
    ScoredTrees,
    Step,
    compute_token_advantages,
    expand_token_nodes,
    grow_tree,
    layout_rows,
)


class SyncEnvironment:
    """Adapts two plain callables to carl_core's `Environment`, for simulations and tests."""

    def __init__(self, step: Callable[[RolloutTree, int], Step], score: Callable[[RolloutTree, int], float]) -> None:
        self._step, self._score = step, score

    async def step(self, tree: RolloutTree, node_id: int) -> Step:
        return self._step(tree, node_id)

    async def score(self, tree: RolloutTree, leaf_id: int) -> float:
        return self._score(tree, leaf_id)


def grow_tree_sync(
    tree: RolloutTree,
    config: CARLConfig,
    step: Callable[[RolloutTree, int], Step],
    score: Callable[[RolloutTree, int], float],
    rng: random.Random | None = None,
) -> RolloutTree:
    """`grow_tree` for synchronous step/score functions (no event loop needed by the caller)."""
    return asyncio.run(grow_tree(tree, ForkPlanner(config, rng), SyncEnvironment(step, score)))


def update_state_entropy(h_hat: float, n_hat: int, h_new: float) -> tuple[float, int]:
    """Alg. 1, line 18, one update at a time: h <- (h' + h * n) / (n + 1) (the reference for the closed form)."""
    if n_hat == 0:
        return h_new, 1
    return (h_new + h_hat * n_hat) / (n_hat + 1), n_hat + 1


@dataclass
class FlatRow:
    """A laid-out row with its token advantages, in the shape the pre-refactor `flatten_trees` returned."""

    uid: str
    tree_index: int
    leaf: int
    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    advantages: list[float]
    rollout_log_probs: list[float]
    token_node: list[int]


def flatten_trees(trees: list[RolloutTree], scored: ScoredTrees) -> list[FlatRow]:
    """The production path for a batch of trees: `layout_rows` per tree, then `compute_token_advantages`."""
    out = []
    for b, tree in enumerate(trees):
        base = scored.arrays.offsets[b]
        trained = scored.trained[base : base + len(tree.nodes)].tolist()
        for row in layout_rows(tree, trained):
            width = len(row.response_ids)
            token_node = expand_token_nodes([row.token_nodes], [base], width)
            mask = torch.tensor([row.response_mask])
            adv = compute_token_advantages(scored.advantage, scored.trained, token_node, mask)[0]
            local = [v - base if v >= 0 else -1 for v in token_node[0].tolist()]
            out.append(
                FlatRow(
                    tree.uid,
                    b,
                    row.leaf,
                    row.prompt_ids,
                    row.response_ids,
                    row.response_mask,
                    adv.tolist(),
                    row.rollout_log_probs,
                    local,
                )
            )
    return out


def check_tree_record(record: dict[str, Any], atol: float = 1e-6) -> None:
    """Raises ValueError naming the first broken invariant of a dumped tree (an independent, per-node reference).

    Checked: one root with `parent: null`; rewards on leaves only; a leaf's value is its reward, or null when the
    environment ended it (`tool_error`: no outcome); `num_children` is the number of samples at the state (the sum of
    its children's `count`); with `mean` aggregation, each inner value is the count-weighted mean of its children
    that have a value (null if none has); with the `critical` update set, exactly the actions with a value whose
    source state has more than one child with a value are trained, each with advantage count * (V(v) - V(u)), all
    others with 0.
    """
    uid = record.get("uid")
    nodes = {n["id"]: n for n in record["nodes"]}
    roots = [n for n in nodes.values() if n["parent"] is None]
    if len(roots) != 1:
        raise ValueError(f"tree {uid}: {len(roots)} roots (parent null); exactly one expected.")
    kids: dict[int, list[int]] = {i: [] for i in nodes}
    for n in nodes.values():
        if n["parent"] is not None:
            if n["parent"] not in nodes:
                raise ValueError(f"tree {uid}: node {n['id']} has missing parent {n['parent']}.")
            kids[n["parent"]].append(n["id"])

    def count(i: int) -> int:
        return nodes[i].get("count", 1)

    def valued(i: int) -> list[int]:
        return [c for c in kids[i] if nodes[c]["value"] is not None]

    for i, n in nodes.items():
        samples = sum(count(c) for c in kids[i])
        if n["num_children"] != samples:
            raise ValueError(f"tree {uid}: node {i} says num_children={n['num_children']}, has {samples} samples.")
        if kids[i]:
            if n["reward"] is not None:
                raise ValueError(f"tree {uid}: inner node {i} carries a reward.")
            if record.get("value_aggregation", "mean") == "mean":
                weight = sum(count(c) for c in valued(i))
                mean = sum(count(c) * nodes[c]["value"] for c in valued(i)) / weight if weight else None
                if (mean is None) != (n["value"] is None) or (mean is not None and abs(n["value"] - mean) > atol):
                    raise ValueError(f"tree {uid}: V({i})={n['value']} is not the weighted mean of its children.")
        else:
            if n["reward"] is None:
                raise ValueError(f"tree {uid}: leaf {i} has no reward.")
            expected = None if (n.get("finish_reason") or "").split(":")[0] == "tool_error" else n["reward"]
            if (expected is None) != (n["value"] is None) or (
                expected is not None and abs(n["value"] - expected) > atol
            ):
                raise ValueError(f"tree {uid}: leaf {i} has value {n['value']}, expected {expected} (its reward).")
        if n["parent"] is None:
            if n["trained"]:
                raise ValueError(f"tree {uid}: the root is marked trained; only actions (edges) can be.")
            continue
        if record.get("update_set", "critical") == "critical":
            parent = nodes[n["parent"]]
            critical = n["value"] is not None and len(valued(parent["id"])) > 1
            if n["trained"] != critical:
                raise ValueError(
                    f"tree {uid}: action into node {i} has trained={n['trained']} but its source state has "
                    f"{len(valued(parent['id']))} children with a value (trained iff more than one, Eq. 13)."
                )
            expected = count(i) * (n["value"] - parent["value"]) if critical else 0.0
            if abs(n["advantage"] - expected) > atol:
                raise ValueError(f"tree {uid}: A(->{i})={n['advantage']}, expected count*(V(v)-V(u))={expected}.")


# ------------------------------------------------ the test MDP of test_unbiased.py and benchmarks/fork_rules.py
# At the root two actions, each with probability 1/2. Action "a" (token 10) leads to state A, where 8 actions are
# equally likely and 2 of them win (R = 1, else 0); action "b" (token 11) leads to state B, one action, R = 1.
EXPECTED = 0.625
"""E[R] = 1/2 * 2/8 + 1/2 * 1."""


def mdp_step(rng):
    def step(tree, node):
        if tree.nodes[node].depth == 0:
            return Step([10 + rng.randrange(2)], [math.log(0.5)])
        if tree.nodes[node].action.token_ids[0] == 10:  # state A
            return Step([20 + rng.randrange(8)], [math.log(1 / 8)], done=True)
        return Step([30], [0.0], done=True)  # state B

    return step


def mdp_reward(tree, leaf):
    return 1.0 if tree.nodes[leaf].action.token_ids[0] in (20, 21, 30) else 0.0
