"""Test-only helpers over carl_core: synchronous tree growth, the dump invariant check, and the old row view.

None of this is used in production; it lives here so that carl_core stays the algorithm alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from carl_core import (
    CARLConfig,
    Draw,
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

    async def step(self, tree: RolloutTree, node_id: int, draw: Draw) -> Step:
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


def _hash(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


class ScriptedEnvironment:
    """A policy keyed on (seed, prefix, rollout, turn): the same draws give the same actions, whatever the order in
    which concurrent rollouts run. `yields(draw)` asyncio yields before a step returns reorder the rollouts (a stand-in
    for an inference server's varying latency); `stop(tree, node, draw)` may return a no-action finish reason.

    Actions come from a small vocabulary (`vocab`), so identical actions at a state happen and merge.
    """

    def __init__(
        self,
        seed: int = 0,
        vocab: int = 4,
        p_answer: float = 0.3,
        yields: Callable[[Draw], int] | None = None,
        stop: Callable[[RolloutTree, int, Draw], str | None] | None = None,
    ) -> None:
        self.seed, self.vocab, self.p_answer = seed, vocab, p_answer
        self.yields, self.stop = yields or (lambda draw: 0), stop or (lambda tree, node, draw: None)
        self.scored: list[int] = []

    async def step(self, tree: RolloutTree, node_id: int, draw: Draw) -> Step:
        prefix = tuple(tree.prefix_ids(node_id))
        for _ in range(self.yields(draw)):
            await asyncio.sleep(0)
        reason = self.stop(tree, node_id, draw)
        if reason is not None:
            return Step((), (), finish_reason=reason)
        h = _hash(self.seed, prefix, draw.rollout, draw.turn)
        done = (h >> 40) % 1000 < self.p_answer * 1000
        log_prob = -((h >> 8) % 1_000_003) / 400_000 - 0.01
        return Step([10 + h % self.vocab], [log_prob], () if done else (99,), done, "answer" if done else None)

    async def score(self, tree: RolloutTree, leaf_id: int) -> float:
        self.scored.append(leaf_id)
        return float(_hash(self.seed, tuple(tree.prefix_ids(leaf_id))) % 3) / 2


def reference_alg1(prompt: list[int], config: CARLConfig, env: ScriptedEnvironment) -> RolloutTree:
    """Alg. 1 as the paper writes it, one rollout after another (K = 1), with h_hat and n_hat kept per state in plain
    Python floats: an independent reference for `grow_tree` (which uses `view`, tensors and canonical order)."""

    def run(tree: RolloutTree, start: int) -> None:
        rollout, node, turn = tree.start_rollout(start), start, 0
        while True:
            step = asyncio.run(env.step(tree, node, Draw(rollout, turn)))
            turn += 1
            if step.token_ids:
                node = tree.add_action(node, step.token_ids, step.log_probs, step.observation_ids, done=step.done,
                                       finish_reason=step.finish_reason, rollout=rollout)  # fmt: skip
            else:
                node = tree.stop(node, step.finish_reason or "no_action", rollout)
            if tree.nodes[node].terminal:
                if tree.nodes[node].reward is None:
                    tree.set_reward(node, asyncio.run(env.score(tree, node)))
                tree.end_rollout(rollout, node)
                return

    tree = RolloutTree(prompt, config.max_actions, merge=config.merge)
    for _ in range(config.n0):
        run(tree, 0)
    for _ in range(config.n_forks):
        best, best_key = None, None
        for s in tree.nodes:  # creation order: with one rollout at a time it is the canonical order
            if not s.children or s.terminal or s.depth >= tree.max_actions:
                continue
            kids = [tree.nodes[c] for c in s.children]
            n = sum(c.count for c in kids)
            h = sum(c.count * (c.action.entropy if c.action else 0.0) for c in kids) / n
            if best_key is None or h / n > best_key:
                best, best_key = s.id, h / n
        assert best is not None
        tree.fork_points.append(best)
        run(tree, best)
    return tree


def ended(tree: RolloutTree) -> int:
    """Rollouts of a tree that ended in a leaf."""
    return sum(leaf is not None for leaf in tree.rollout_leaf)
