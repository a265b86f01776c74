"""Fork rules measured without training: their bias on a known MDP, and their signal on SynthHop's training questions.

    python -m benchmarks.fork_rules bias  [--trees 4000]        # mean root value on the test MDP, +- its SE
    python -m benchmarks.fork_rules pilot [--questions 64]      # the SFT start's trees on training questions

`bias`: the MDP of tests/core/test_unbiased.py (E[R] = 0.625; the root's actions are equally likely, A's subtree
wins 2 times in 8, B always wins) grown by `ForkPlanner` with each rule, N0 = 1 and N = 8 as in that test, merging off
and on; and `pool`: density forks with the step-level fork pool (`recipe.carl.pool`), batches of 16 trees sharing
16 x 8 forks, a floor of 2 forks per tree. The plain-mean backup (Alg. 2) is unbiased when a state's children are
i.i.d. samples whose number does not depend on what was sampled (`random`); rules that choose where to fork from what
they have seen (`density` from the sampled actions' entropy, `spread` from the outcomes too, the pool from the trees'
outcomes) bias it. Printed: the mean root value over the trees, its
standard error and the bias in standard errors.

`pilot`: how the rule's constant (`spread_prior`, lambda) was chosen without the held-out questions. At the SFT start,
on the first training questions (the RL runs train on them too, so nothing held out is looked at), one tree per
question and rule (the experiment's shape: N0 = 2, N = 6, merging on, T = 0.7, per-request seeds so every rule meets
the same random numbers where its requests coincide), then per rule: the share of trees with signal (outcomes not all
equal), trained actions with a nonzero advantage per generated action, and the mean |A| of trained actions. The
experiment uses the lambda with the most nonzero-advantage trained actions per generated action.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from benchmarks.carl_vs_grpo import PROTOCOL, demo_config, prepare
from carl_core import CARLConfig, ForkPlanner, RolloutTree, compute_node_values, grow_tree, pack_trees, score_trees
from recipe.carl.io import write_json
from recipe.carl.pool import ForkPool, PoolSettings, allocate, compute_tree_value, grow_pooled, tree_outcomes
from recipe.carl.tiny.local_agent import LocalAgent
from tests.core.support import EXPECTED, SyncEnvironment, grow_tree_sync, mdp_reward, mdp_step

REPO = Path(__file__).resolve().parents[1]
RULES = ("random", "density", "spread")


def mdp_root_values(selection: str, merge: bool, trees: int, seed: int = 0) -> list[float]:
    """V(root) of `trees` trees of the test MDP grown by the planner with one rule."""
    rng = random.Random(seed)
    config = CARLConfig(n0=1, n_forks=8, selection=selection, max_actions=2)
    grown = [
        grow_tree_sync(RolloutTree([1], 2, merge=merge), config, mdp_step(rng), mdp_reward, random.Random(rng.random()))
        for _ in range(trees)
    ]
    a = pack_trees(grown)
    v = compute_node_values(a.parent, a.reward, a.is_leaf, a.depth, count=a.weight)
    return [float(v[o]) for o in a.offsets]


def pooled_root_values(
    merge: bool, trees: int, batch: int = 16, floor: int = 2, prior: float = 2.0, seed: int = 0
) -> list[float]:
    """V(root) of `trees` MDP trees (density forks) grown in batches of `batch` sharing a fork pool
    (`recipe.carl.pool`): `floor` forks each, then the rest of batch x 8 dealt by the pool's rule."""
    rng = random.Random(seed)
    config = CARLConfig(n0=1, n_forks=8, max_actions=2)
    env = SyncEnvironment(mdp_step(rng), mdp_reward)
    values: list[float] = []
    for _ in range(trees // batch):
        grown = [RolloutTree([1], 2, merge=merge) for _ in range(batch)]
        planners = [ForkPlanner(config, random.Random(rng.random())) for _ in grown]
        for tree, planner in zip(grown, planners, strict=True):
            asyncio.run(grow_tree(tree, planner, env, forks=floor))
        outcomes = [tree_outcomes(t) for t in grown]
        rewards = [r for rs, _ in outcomes for r in rs]
        prior_var = ((max(rewards) - min(rewards)) / 2) ** 2
        worth = [compute_tree_value(rs, cs, prior, prior_var) for rs, cs in outcomes]
        used = sum(len(t.fork_points) for t in grown)
        extra = allocate(worth, [sum(cs) for _, cs in outcomes], batch * config.n_forks - used)
        for tree, planner, n in zip(grown, planners, extra, strict=True):
            asyncio.run(grow_tree(tree, planner, env, forks=n))
        a = pack_trees(grown)
        v = compute_node_values(a.parent, a.reward, a.is_leaf, a.depth, count=a.weight)
        values += [float(v[o]) for o in a.offsets]
    return values


def bias(trees: int, batch: int = 16, floor: int = 2) -> list[dict[str, Any]]:
    """Mean root value (+- SE) per rule and merging, and under the fork pool, against E[R] = 0.625."""
    rows = []
    for merge in (False, True):
        for selection in RULES + ("pool",):
            if selection == "pool":
                values = pooled_root_values(merge, trees, batch, floor)
            else:
                values = mdp_root_values(selection, merge, trees)
            mean, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
            rows.append({"selection": selection, "merge": merge, "trees": len(values), "mean_root_value": mean,
                         "se": se, "bias": mean - EXPECTED, "bias_in_se": (mean - EXPECTED) / se,
                         **({"batch": batch, "floor": floor} if selection == "pool" else {})})  # fmt: skip
    return rows


def pilot(questions: int, priors: list[float], seed: int = 0, root: Path = REPO / "runs" / "carl_vs_grpo"):
    """Trees of the SFT start on the first `questions` training questions, one per question and rule (the data and
    SFT start are the experiment's, `root/shared`, made there if missing)."""
    shared = prepare(root, PROTOCOL)
    cfg = demo_config(PROTOCOL, "carl", seed)
    agent = LocalAgent(shared / "policy_sft", shared / "data", topk=cfg.topk, max_actions=cfg.max_actions,
                       response_length=cfg.max_response_length, seed=seed)  # fmt: skip
    agent.request_seed = seed
    rows = agent.rows("train", questions)
    variants = [("random", None), ("density", None)] + [("spread", p) for p in priors]
    out = []
    for selection, prior in variants:
        config = CARLConfig(n0=cfg.n0, n_forks=cfg.n_forks, max_actions=cfg.max_actions, selection=selection,
                            spread_prior=prior or 2.0, merge=True, seed=seed)  # fmt: skip
        start = time.time()

        trees = asyncio.run(grow_trees(agent, rows, config, cfg.temperature, seed))
        s = score_trees(trees, config)
        a, trained = s.arrays, s.trained
        generated = float(a.count[a.parent >= 0].sum())
        nonzero = float((trained & (s.advantage != 0)).sum())
        leaf_r, leaf_t = a.reward[a.has_outcome], a.tree_index[a.has_outcome]
        spread = [bool(leaf_r[leaf_t == b].max() > leaf_r[leaf_t == b].min()) for b in range(a.num_trees)]
        out.append({
            "selection": selection, "spread_prior": prior, "trees": len(trees), "generated_actions": generated,
            "trained_actions": float(trained.sum()), "nonzero_advantage_actions": nonzero,
            "nonzero_per_generated": nonzero / generated, "signal_tree_share": sum(spread) / len(spread),
            "mean_abs_advantage": float(s.advantage[trained].abs().mean()) if trained.any() else 0.0,
            "merged_samples": float((a.count[a.parent >= 0] - 1).sum()), "wall_s": round(time.time() - start, 1),
        })  # fmt: skip
        print(json.dumps(out[-1]), flush=True)
    return out


#: The pool pilot's grid and its rule, written before it ran (issue 32): on the first `questions` training questions in
#: batches of 16 (the experiment's step, one agent-loop worker), at the SFT start, the setting with the most trained
#: actions with A != 0 per generated action (CARL) or generated actions with A != 0 per generated action (GRPO, whose
#: every action is trained); ties to the first in this order. The chosen values go into the second protocol.
POOL_GRID = {
    "carl": [(f, p) for f in (1, 2, 3) for p in (1.0, 4.0)],
    "grpo": [(f, p) for f in (2, 4) for p in (1.0, 4.0)],
}


def pool_pilot(questions: int, seed: int = 0, root: Path = REPO / "runs" / "carl_vs_grpo_2") -> dict[str, Any]:
    """The pool's floor and prior chosen on training questions (`POOL_GRID`), with the no-pool rows beside."""
    shared = prepare(root, PROTOCOL)
    cfg = demo_config(PROTOCOL, "carl", seed)
    agent = LocalAgent(shared / "policy_sft", shared / "data", topk=cfg.topk, max_actions=cfg.max_actions,
                       response_length=cfg.max_response_length, seed=seed)  # fmt: skip
    agent.request_seed = seed
    rows = agent.rows("train", questions)
    config = CARLConfig(n0=cfg.n0, n_forks=cfg.n_forks, max_actions=cfg.max_actions, merge=True, seed=seed)
    group = cfg.n0 + cfg.n_forks
    out: dict[str, Any] = {"carl": [], "grpo": []}
    for algo in ("carl", "grpo"):
        for floor, prior in [(None, None), *POOL_GRID[algo]]:
            start = time.time()
            settings = (
                None if floor is None else PoolSettings(floor=floor, prior=prior, group=group if algo == "grpo" else 0)
            )
            trees = asyncio.run(grow_batches(agent, rows, config, settings, cfg.temperature, seed, algo, group))
            row = {
                "floor": floor,
                "prior": prior,
                **signal_of(trees, config, algo),
                "wall_s": round(time.time() - start, 1),
            }
            out[algo].append(row)
            print(algo, json.dumps(row), flush=True)
        pooled = [r for r in out[algo] if r["floor"] is not None]
        best = max(pooled, key=lambda r: r["nonzero_per_generated"])  # the first of equal ones
        out[f"{algo}_chosen"] = {"floor": best["floor"], "prior": best["prior"]}
    return out


async def grow_batches(agent, rows, config: CARLConfig, settings: PoolSettings | None, temperature: float, seed: int,
                       algo: str, group: int) -> list[RolloutTree]:  # fmt: skip
    """The rows' trees (GRPO: groups) in batches of 16 sharing a pool (none: N forks each, or `group` chains)."""
    trees: list[RolloutTree] = []
    for first in range(0, len(rows), 16):
        batch = rows[first : first + 16]
        pool = ForkPool(settings, config.n_forks if algo == "carl" else group) if settings else None
        if pool is not None:
            for i in range(first, first + len(batch)):
                pool.join(i)
        grown = [
            grow_one(agent, first + j, r, config, pool, temperature, seed, algo, group) for j, r in enumerate(batch)
        ]
        trees += await asyncio.gather(*grown)
    return trees


async def grow_one(agent, i: int, row: dict[str, Any], config: CARLConfig, pool: ForkPool | None, temperature: float,
                   seed: int, algo: str, group: int) -> RolloutTree:  # fmt: skip
    """One question's tree (GRPO: group), in `pool` if there is one."""
    tree = RolloutTree(agent.prompt_ids(row), config.max_actions, uid=f"p{i}", merge=config.merge and algo == "carl")
    env, rng = agent.env(row, temperature, f"p{i}"), random.Random(f"{seed}:{i}")
    if pool is not None:
        await grow_pooled(tree, env, pool, i, config, rng, grpo=algo == "grpo")
        return tree
    return await grow_tree(
        tree, ForkPlanner(config if algo == "carl" else replace(config, n0=group, n_forks=0), rng), env
    )


def signal_of(trees: list[RolloutTree], config: CARLConfig, algo: str) -> dict[str, float]:
    """Generated actions, and those trained with A != 0 (GRPO: in a group whose rewards differ from the mean)."""
    if algo == "carl":
        s = score_trees(trees, config)
        generated = float(s.arrays.count[s.arrays.parent >= 0].sum())
        nonzero = float((s.trained & (s.advantage != 0)).sum())
    else:
        generated = nonzero = 0.0
        for tree in trees:  # exact arithmetic: eight rewards of 0.1 have a float mean that is not 0.1
            leaves = [tree.nodes[v] for v in tree.leaves()]
            mean = sum(Fraction(n.reward or 0.0) for n in leaves) / len(leaves)
            generated += sum(n.depth for n in leaves)
            nonzero += sum(n.depth for n in leaves if Fraction(n.reward or 0.0) != mean)
    return {"trees": len(trees), "generated_actions": generated, "nonzero_advantage_actions": nonzero,
            "nonzero_per_generated": nonzero / generated if generated else 0.0}  # fmt: skip


async def grow_trees(agent, rows: list[dict[str, Any]], config: CARLConfig, temperature: float, seed: int):
    """One tree per row, all concurrently (the engine batches their requests)."""

    async def grow(i: int, row: dict[str, Any]) -> RolloutTree:
        tree = RolloutTree(agent.prompt_ids(row), config.max_actions, uid=f"p{i}", merge=config.merge)
        env = agent.env(row, temperature, f"p{i}")
        return await grow_tree(tree, ForkPlanner(config, random.Random(f"{seed}:{i}")), env)

    return await asyncio.gather(*(grow(i, r) for i, r in enumerate(rows)))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fork_rules", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bias", help="mean root value on the test MDP")
    b.add_argument("--trees", type=int, default=4000)
    pp = sub.add_parser("pool-pilot", help="the fork pool's floor and prior, on training questions (POOL_GRID)")
    pp.add_argument("--questions", type=int, default=64)
    q = sub.add_parser("pilot", help="the SFT start's trees on training questions")
    q.add_argument("--questions", type=int, default=64)
    q.add_argument("--priors", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    args = p.parse_args(argv)
    if args.what == "bias":
        if args.trees < 2:
            raise SystemExit(f"error: --trees {args.trees} must be >= 2 (a standard error needs two trees).")
        rows = bias(args.trees)
        for r in rows:
            print(f"{r['selection']:8s} merge={r['merge']!s:5s} V(root) = {r['mean_root_value']:.4f} "
                  f"+- {r['se']:.4f} (bias {r['bias']:+.4f} = {r['bias_in_se']:+.1f} SE; E[R] = 0.625)")  # fmt: skip
    elif args.what == "pool-pilot":
        if args.questions < 16:
            raise SystemExit("error: --questions must be >= 16 (the pool works on batches of 16 trees).")
        torch.set_num_threads(2)
        rows = pool_pilot(args.questions)
    else:
        if args.questions < 1 or any(x <= 0 for x in args.priors):
            raise SystemExit("error: --questions must be >= 1 and every --priors value > 0.")
        torch.set_num_threads(2)
        rows = pilot(args.questions, args.priors)
    if args.out:
        write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
