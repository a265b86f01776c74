"""The bootstrap's speed: the fast mean path against the generic path on the same draws, at the experiments' shape.

    python -m benchmarks.bench_stats [--seeds 4] [--questions 500] [--n-boot 10000]

`recipe.carl.evaluate.stats` promises that its mean statistics (`mean_interval`, `paired_difference`) skip building
the replicates (10,000 replicates of 4 x 479: ~0.1 s on one core) and give the generic path's numbers on the same
draws. This prints, measured in one run: each path's time, their ratio, and whether the two intervals are identical;
plus the second protocol's generic statistic (the gain per 1,000 generated actions, four arrays per replicate), the
slowest interval its report computes. No assertion on time here: tests check the numbers, this reports the speed.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from recipe.carl.evaluate.stats import bootstrap, mean_interval


def _timed(fn, repeats: int) -> tuple[Any, float]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def measure(seeds: int, questions: int, n_boot: int, repeats: int = 3) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(seeds, questions)) / 4  # sampled exact match: k of 4 episodes right
    b = rng.integers(0, 5, size=(seeds, questions)) / 4
    cost_a = np.repeat(rng.uniform(7, 9, size=(seeds, 1)), questions, axis=1)  # thousands of generated actions
    cost_b = np.repeat(rng.uniform(11, 13, size=(seeds, 1)), questions, axis=1)
    fast, fast_s = _timed(lambda: mean_interval(a, n_boot=n_boot), repeats)
    generic, generic_s = _timed(lambda: bootstrap(np.mean, a, n_boot=n_boot), repeats)
    per_1k = lambda ga, ca, gb, cb: ga.mean() / ca.mean() - gb.mean() / cb.mean()  # noqa: E731 (the report's)
    _, per_1k_s = _timed(lambda: bootstrap(per_1k, a, cost_a, b, cost_b, n_boot=n_boot), 1)
    same = bool(np.isclose(fast.low, generic.low, rtol=0, atol=1e-12) and
                np.isclose(fast.high, generic.high, rtol=0, atol=1e-12))  # fmt: skip
    return {"shape": [seeds, questions], "n_boot": n_boot, "fast_s": fast_s, "generic_s": generic_s,
            "generic_over_fast": generic_s / fast_s, "same_interval": same, "per_1k_generic_s": per_1k_s}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_stats", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--questions", type=int, default=500)
    p.add_argument("--n-boot", type=int, default=10_000)
    args = p.parse_args(argv)
    for name in ("seeds", "questions", "n_boot"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(args, name)} must be >= 1.")
    result = measure(args.seeds, args.questions, args.n_boot)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
