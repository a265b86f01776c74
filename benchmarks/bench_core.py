"""CARL's per-batch bookkeeping against verl's GRPO advantage on tensors of the same shape.

Times value backup + advantages (`score_trees`) + flattening (`flatten_batch(...).to_padded()`) for B trees of
24 leaves (N0 = 8, N = 16), ~5 actions of 64 tokens per trajectory, and in the same run verl's
`compute_grpo_outcome_advantage` on a (B * 24, response_length) batch. Target: CARL <= 5x GRPO, linear in B.

    python -m benchmarks.bench_core [--trees 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np
import torch

from carl_core import CARLConfig, RolloutTree, Step, flatten_batch, grow_tree_sync, score_trees

TOKENS_PER_ACTION = 64
OBS_TOKENS = 16


def make_trees(num_trees: int, config: CARLConfig, seed: int = 0) -> list[RolloutTree]:
    rng = random.Random(seed)

    def step(tree: RolloutTree, node: int) -> Step:
        done = rng.random() < 0.2  # ~5 actions per trajectory
        return Step(
            [rng.randrange(1000)] * TOKENS_PER_ACTION,
            [math.log(rng.uniform(0.1, 1.0))] * TOKENS_PER_ACTION,
            [7] * OBS_TOKENS,
            done=done,
        )

    return [
        grow_tree_sync(
            RolloutTree(list(range(32)), config.max_actions, uid=f"q{i}"),
            config,
            step,
            lambda t, n: float(rng.random() < 0.5),
            rng=random.Random(i),
        )
        for i in range(num_trees)
    ]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(num_trees: int, config: CARLConfig, repeats: int) -> tuple[int, int, float, float]:
    """(rows, response_length, CARL seconds, GRPO seconds) for one batch size, best of `repeats`."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage  # only the baseline needs verl

    trees = make_trees(num_trees, config)

    def carl() -> dict:
        scored = score_trees(trees, config, validate=False)
        return flatten_batch(trees, scored).to_padded()

    length = carl()["responses"].shape[1]
    # GRPO on one trajectory per leaf: the same number of rows and response length as a leaf-path layout.
    rows = num_trees * config.num_leaves
    rewards = torch.zeros(rows, length)
    rewards[:, -1] = torch.rand(rows)
    mask = torch.ones(rows, length)
    index = np.repeat(np.array([f"q{i}" for i in range(num_trees)], dtype=object), config.num_leaves)
    t_grpo = best_of(lambda: compute_grpo_outcome_advantage(rewards, mask, index), repeats)
    return rows, length, best_of(carl, repeats), t_grpo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = CARLConfig(n0=8, n_forks=16, max_actions=16)
    print(f"{'trees':>6} {'rows':>6} {'resp_len':>8} {'carl_s':>8} {'grpo_s':>8} {'ratio':>6}")
    for num_trees in sorted({max(args.trees // 4, 1), max(args.trees // 2, 1), args.trees}):
        rows, length, t_carl, t_grpo = measure(num_trees, config, args.repeats)
        print(f"{num_trees:>6} {rows:>6} {length:>8} {t_carl:>8.4f} {t_grpo:>8.4f} {t_carl / t_grpo:>6.2f}")


if __name__ == "__main__":
    main()
