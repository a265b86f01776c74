"""Forks in flight against Alg. 1 (issue 29 item 5): where the forks go and what the trees train, K = 1 against K > 1.

    python -m benchmarks.fork_fidelity --out benchmarks/results/fork_fidelity.json      # K = 1 vs 2 and 4

The same questions' trees, from the same policy and the same sampling seeds (per request, keyed on (rollout, turn):
a root rollout draws the same numbers at every K), grown at K = 1 and at each K of `--ks`: the experiment's shape
(the shipped SFT start of the embedded default, SynthHop's first `--questions` training questions, N0 = 2, N = 6,
T_max 6, T = 0.7, merging on, density forks). Per tree: the forks' mean depth, the share of forks at states whose
children's values differ, the share of trained actions with A != 0, whether every outcome agreed (no signal), and the
actions generated. Each statistic is pooled over the trees (a ratio of sums), and K's difference from K = 1 gets a
95 % bootstrap interval over questions, paired (`recipe.carl.evaluate.stats.bootstrap`).

The margins were fixed before the first measurement (`MARGINS`): K keeps Alg. 1's fidelity on a statistic when the
paired interval of the difference lies inside its margin; otherwise the cost is stated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.carl_vs_grpo import PROTOCOL, demo_config, prepare
from benchmarks.fork_rules import grow_trees
from carl_core import CARLConfig, RolloutTree, score_trees
from recipe.carl.evaluate.stats import bootstrap
from recipe.carl.io import write_json
from recipe.carl.tiny.local_agent import LocalAgent

REPO = Path(__file__).resolve().parents[1]

#: Stated before measuring (docs/measurements.md, "Forks in flight: fidelity"): the largest difference from K = 1
#: that still counts as the same trees. Depth in actions; shares in points (fractions); actions as a ratio.
MARGINS = {
    "fork_depth": 0.25,
    "forks_where_values_differ": 0.02,
    "trained_nonzero_share": 0.02,
    "no_signal_trees": 0.02,
    "actions_generated_ratio": 0.05,
}


def tree_statistics(trees: list[RolloutTree], config: CARLConfig) -> dict[str, np.ndarray]:
    """Per tree, the numerator and denominator of each pooled statistic [each shape: (n_trees,)]."""
    scored = score_trees(trees, config)
    a, value = scored.arrays, scored.node_value
    out: dict[str, list[float]] = {k: [] for k in ("depth_sum", "forks", "split_forks", "nonzero", "trained",
                                                   "no_signal", "generated")}  # fmt: skip
    for b, tree in enumerate(trees):
        base, n = a.offsets[b], len(tree.nodes)
        nodes = range(base, base + n)
        kids: dict[int, list[float]] = {}
        for v in nodes:
            p = int(a.parent[v])
            if p >= 0 and not torch.isnan(value[v]) and int(a.weight[v]) > 0:
                kids.setdefault(p - base, []).append(float(value[v]))
        forks = tree.fork_points
        out["forks"].append(len(forks))
        out["depth_sum"].append(sum(tree.nodes[s].depth for s in forks))
        out["split_forks"].append(sum(len(set(kids.get(s, []))) > 1 for s in forks))
        trained = scored.trained[base : base + n]
        out["trained"].append(float(trained.sum()))
        out["nonzero"].append(float((trained & (scored.advantage[base : base + n] != 0)).sum()))
        leaves = [float(a.reward[v]) for v in nodes if bool(a.has_outcome[v])]
        out["no_signal"].append(float(len(set(leaves)) <= 1))
        out["generated"].append(float(a.count[base + 1 : base + n].sum()))
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


STATISTICS = {
    "fork_depth": ("depth_sum", "forks"),
    "forks_where_values_differ": ("split_forks", "forks"),
    "trained_nonzero_share": ("nonzero", "trained"),
    "no_signal_trees": ("no_signal", None),
    "actions_generated_per_tree": ("generated", None),
}


def pooled(num: np.ndarray, den: np.ndarray | None) -> float:
    return float(num.sum() / den.sum()) if den is not None else float(num.mean())


def _pooled_difference(b_num, o_num, b_den=None, o_den=None) -> float:
    """K's pooled statistic minus K = 1's (a ratio of sums with denominators, a mean without)."""
    if b_den is None:
        return float(o_num.mean() - b_num.mean())
    return float(o_num.sum() / o_den.sum() - b_num.sum() / b_den.sum())


def compare(base: dict[str, np.ndarray], other: dict[str, np.ndarray], n_boot: int = 10_000) -> dict[str, Any]:
    """Each statistic at K = 1 and at K, and K - K = 1 with its paired interval over questions (the trees of one
    question at the two settings stay together in every replicate); `inside_margin` per `MARGINS`."""
    out: dict[str, Any] = {}
    for name, (num, den) in STATISTICS.items():
        arrays = [base[num][None], other[num][None]] + ([base[den][None], other[den][None]] if den else [])
        interval = bootstrap(_pooled_difference, *arrays, n_boot=n_boot)
        row = {"k1": pooled(base[num], base[den] if den else None),
               "k": pooled(other[num], other[den] if den else None),
               "difference": interval.estimate, "low": interval.low, "high": interval.high}  # fmt: skip
        if name == "actions_generated_per_tree":  # judged as a ratio
            ratio = bootstrap(lambda b, o: o.mean() / b.mean(), base[num][None], other[num][None], n_boot=n_boot)
            row.update(ratio=ratio.estimate, ratio_low=ratio.low, ratio_high=ratio.high)
            margin = MARGINS["actions_generated_ratio"]
            row["inside_margin"] = bool(1 - margin <= ratio.low and ratio.high <= 1 + margin)
        else:
            margin = MARGINS[name]
            row["inside_margin"] = bool(-margin <= interval.low and interval.high <= margin)
        out[name] = row
    return out


def run(questions: int, ks: list[int], seed: int = 0, root: Path = REPO / "runs" / "carl_vs_grpo_2") -> dict:
    """Grows the trees at K = 1 and each K and compares them."""
    shared = prepare(root, PROTOCOL)
    cfg = demo_config(PROTOCOL, "carl", seed)
    agent = LocalAgent(shared / "policy_sft", shared / "data", topk=cfg.topk, max_actions=cfg.max_actions,
                       response_length=cfg.max_response_length, seed=seed)  # fmt: skip
    agent.request_seed = seed
    rows = agent.rows("train", questions)
    stats, wall = {}, {}
    for k in [1, *ks]:
        config = CARLConfig(n0=cfg.n0, n_forks=cfg.n_forks, max_actions=cfg.max_actions, merge=True, seed=seed,
                            forks_in_flight=k)  # fmt: skip
        start = time.time()
        trees = asyncio.run(grow_trees(agent, rows, config, cfg.temperature, seed))
        wall[k] = round(time.time() - start, 1)
        stats[k] = tree_statistics(trees, config)
        print(f"K = {k}: {len(trees)} trees in {wall[k]} s", flush=True)
    return {
        "questions": questions,
        "shape": {"n0": cfg.n0, "n_forks": cfg.n_forks, "max_actions": cfg.max_actions, "temperature": cfg.temperature},
        "margins": MARGINS,
        "wall_s": wall,
        "versus_k1": {str(k): compare(stats[1], stats[k]) for k in ks},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fork_fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=480, help="training questions, one tree each (default 480)")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="forks in flight to compare with K = 1")
    p.add_argument("--root", type=Path, default=REPO / "runs" / "carl_vs_grpo_2", help="the experiment folder whose "
                   "shared data and SFT start are used (made if missing)")  # fmt: skip
    p.add_argument("--out", type=Path, help="write the result JSON here")
    args = p.parse_args(argv)
    if args.questions < 2 or any(k < 2 for k in args.ks):
        raise SystemExit("error: --questions must be >= 2 and every --ks value >= 2 (K = 1 is the reference).")
    random.seed(0)
    result = run(args.questions, args.ks, root=args.root)
    print(json.dumps(result["versus_k1"], indent=1))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
