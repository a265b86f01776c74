"""CARL's production bookkeeping against verl's GRPO advantage, and the per-step `extra_fields` payload.

1. Time, for B trees of the 7B script's shape (N0 = 8, N = 16, ~5 actions per trajectory): what the agent loop does
   per tree once it is grown (`compute_trained_mask`, `layout_rows`, `describe_tree`, the rows' `extra_fields`),
   plus what the trainer does for the batch (`carl_batch_from_rows` and the registered `carl` estimator), against
   verl's `compute_grpo_outcome_advantage` on one row per leaf of the same width. Target: <= 5x GRPO, linear in B.
2. Payload of one 7B-shaped step (128 trees, ~100-token actions, ~500-token observations): pickled bytes of every
   row's `extra_fields`, padding rows included (verl pads to a multiple of lcm(dp, mini-batch) = 256 rows with deep
   copies of the batch's first row), before issue 17 (per-token advantage lists on every row and the whole tree with
   its token ids and log-probs on each tree's first row) and now (runs of node ids per row, a compact description).

    python -m benchmarks.bench_core [--trees 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import pickle
import random
import time
from typing import Any

import numpy as np
import torch

from carl_core import (
    CARLConfig,
    Draw,
    ForkPlanner,
    RolloutTree,
    Step,
    compute_token_advantages,
    compute_trained_mask,
    describe_tree,
    expand_token_nodes,
    grow_tree,
    layout_rows,
    score_trees,
)

CONFIG = CARLConfig(n0=8, n_forks=16, max_actions=16)


class RandomPolicy:
    """carl_core's `Environment` for a random policy: ~5 actions per trajectory, rewards 0 or 1."""

    def __init__(self, rng: random.Random, action_tokens: int, obs_tokens: int) -> None:
        self.rng, self.action_tokens, self.obs_tokens = rng, action_tokens, obs_tokens

    async def step(self, tree: RolloutTree, node: int, draw: Draw) -> Step:
        n = max(1, int(self.rng.gauss(self.action_tokens, self.action_tokens / 4)))
        lps = [math.log(self.rng.uniform(0.1, 1.0)) for _ in range(n)]
        return Step([self.rng.randrange(1000) for _ in range(n)], lps, [7] * self.obs_tokens, self.rng.random() < 0.2)

    async def score(self, tree: RolloutTree, leaf: int) -> float:
        return float(self.rng.random() < 0.5)


def make_trees(num_trees: int, action_tokens: int, obs_tokens: int, seed: int = 0) -> list[RolloutTree]:
    """Trees of the 7B shape, grown by the real planner under a random policy."""
    env = RandomPolicy(random.Random(seed), action_tokens, obs_tokens)
    trees = [RolloutTree(list(range(64)), CONFIG.max_actions, uid=f"q{i}_0") for i in range(num_trees)]
    for i, tree in enumerate(trees):
        asyncio.run(grow_tree(tree, ForkPlanner(CONFIG, random.Random(i)), env))
    return trees


def agent_loop_fields(tree: RolloutTree) -> list[dict[str, Any]]:
    """The agent loop's per-tree work after growing: structural mask, rows, description, `extra_fields`."""
    parent = torch.tensor([-1 if n.parent is None else n.parent for n in tree.nodes])
    rows = layout_rows(tree, compute_trained_mask(parent, CONFIG.update_set).tolist())
    description = describe_tree(tree)
    description["reward_info"] = [{"score": n.reward} if n.terminal else None for n in tree.nodes]
    description["search"] = {"calls": 0, "errors": 0, "latency_s": 0.0, "last_error": ""}
    return [
        {
            "carl_tree_id": tree.uid,
            "carl_token_nodes": row.token_nodes,
            "carl_leaf": row.leaf,
            "carl_tree": description if i == 0 else None,
            "reward_extra_info": {"score": tree.nodes[row.leaf].reward},
            "len": len(row.response_ids),
            "mask": row.response_mask,
        }
        for i, row in enumerate(rows)
    ]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def batch_inputs(trees: list[RolloutTree]) -> tuple[list[dict[str, Any]], list[str], torch.Tensor]:
    """The rows' `extra_fields`, their uids (questions) and the padded `response_mask` [shape: (rows, width)]."""
    fields = [f for t in trees for f in agent_loop_fields(t)]
    mask = torch.zeros(len(fields), max(f["len"] for f in fields), dtype=torch.long)
    for i, f in enumerate(fields):
        mask[i, : f["len"]] = torch.tensor(f["mask"])
    return fields, [f["carl_tree_id"].rsplit("_", 1)[0] for f in fields], mask


def measure(trees: list[RolloutTree], repeats: int) -> tuple[int, int, float, float]:
    """(rows, response_length, CARL seconds, GRPO seconds) for one batch, best of `repeats`."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    # Here, not at the top: the estimator imports verl.
    from recipe.carl.estimator import carl_batch_from_rows, compute_carl_advantage

    fields, uids, mask = batch_inputs(trees)
    width = mask.shape[1]
    algorithm = {"carl": {"n0": CONFIG.n0, "n_forks": CONFIG.n_forks, "max_actions": CONFIG.max_actions}}

    def carl() -> None:
        rows = [f for t in trees for f in agent_loop_fields(t)]
        batch = carl_batch_from_rows(rows, uids, width)
        compute_carl_advantage(torch.zeros(mask.shape), mask, config=algorithm, carl_batch=batch)

    # GRPO on one trajectory per leaf: the same number of trajectories, at the batch's response length.
    leaves = sum(len(t.leaves()) for t in trees)
    rewards = torch.zeros(leaves, width)
    rewards[:, -1] = torch.rand(leaves)
    index = np.array([t.uid for t in trees for _ in t.leaves()], dtype=object)
    t_grpo = best_of(lambda: compute_grpo_outcome_advantage(rewards, torch.ones(leaves, width), index), repeats)
    return len(fields), width, best_of(carl, repeats), t_grpo


def legacy_tree_dict(tree: RolloutTree) -> dict[str, Any]:
    """The whole tree as the agent loop shipped it before issue 17 (`RolloutTree.to_dict`, token ids included)."""
    return {
        "uid": tree.uid,
        "prompt_ids": tree.prompt_ids,
        "max_actions": tree.max_actions,
        "fork_points": tree.fork_points,
        "aborted": [],  # the legacy payload had this list (always empty since issue 28)
        "nodes": [
            {
                "id": n.id,
                "parent": n.parent,
                "depth": n.depth,
                "children": n.children,
                "terminal": n.terminal,
                "finish_reason": n.finish_reason,
                "reward": n.reward,
                "action": None
                if n.action is None
                else {
                    "token_ids": n.action.token_ids,
                    "log_probs": n.action.log_probs,
                    "observation_ids": n.action.observation_ids,
                    "entropy": n.action.entropy,
                    "info": n.action.info,
                },
            }
            for n in tree.nodes
        ],
    }


def payload(trees: list[RolloutTree], multiple: int = 256) -> tuple[int, int, int, int]:
    """(rows, padding rows, bytes before, bytes after) of one step's `extra_fields`."""
    scored = score_trees(trees, CONFIG)
    before = []
    for b, tree in enumerate(trees):
        base = scored.arrays.offsets[b]
        for i, row in enumerate(layout_rows(tree, scored.trained[base : base + len(tree.nodes)].tolist())):
            token_node = expand_token_nodes([row.token_nodes], [base], len(row.response_ids))
            mask = torch.tensor([row.response_mask])
            advantages = compute_token_advantages(scored.advantage, scored.trained, token_node, mask)[0].tolist()
            before.append(
                {
                    "carl_advantages": advantages,
                    "carl_leaf": row.leaf,
                    "carl_leaf_reward": tree.nodes[row.leaf].reward,
                    "carl_tree": legacy_tree_dict(tree) if i == 0 else None,
                    "reward_extra_info": {"score": tree.nodes[row.leaf].reward},
                }
            )
    after = [{k: v for k, v in f.items() if k not in ("len", "mask")} for t in trees for f in agent_loop_fields(t)]
    pad = -len(after) % multiple
    # verl's padding template is the batch's first row: before issue 17 a tree's first row (with its whole tree);
    # now the CARL trainer puts a row without a tree description first.
    plain = next((f for f in after if f["carl_tree"] is None), after[0])
    size = lambda rows: sum(len(pickle.dumps(r)) for r in rows)  # noqa: E731
    return len(after), pad, size(before) + pad * size(before[:1]), size(after) + pad * size([plain])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print(f"{'trees':>6} {'rows':>6} {'resp_len':>8} {'carl_s':>8} {'grpo_s':>8} {'ratio':>6}")
    ratios = []
    for num_trees in sorted({max(args.trees // 4, 1), max(args.trees // 2, 1), args.trees}):
        trees = make_trees(num_trees, action_tokens=64, obs_tokens=16)
        rows, length, t_carl, t_grpo = measure(trees, args.repeats)
        ratios.append(t_carl / t_grpo)
        print(f"{num_trees:>6} {rows:>6} {length:>8} {t_carl:>8.4f} {t_grpo:>8.4f} {t_carl / t_grpo:>6.2f}")
    rows, pad, before, after = payload(make_trees(args.trees, action_tokens=100, obs_tokens=500))
    print(f"\nextra_fields of one 7B-shaped step ({args.trees} trees, {rows} rows + {pad} padding rows):")
    print(f"  before issue 17: {before / 2**20:8.1f} MiB\n  now:             {after / 2**20:8.2f} MiB")
    line = f"time ratio={max(ratios):.2f} payload ratio={after / before:.4f}"
    print(line)
    return line


if __name__ == "__main__":
    main()
