"""The cost of one RL step of the CARL-against-GRPO experiments, per row layout and per arm.

    python -m benchmarks.bench_step [--steps 10] [--out runs/bench_step]
    python -m benchmarks.bench_step --variants grpo carl_tree carl_k2 carl_pool grpo_pool   # the second protocol's

Runs, back to back and with the experiment's settings otherwise (`benchmarks.carl_vs_grpo.PROTOCOL`, seed 0), a few
steps of each variant through verl's trainer on the CPU, and prints per variant the median step (steps 2 on: the
first holds warm-up) and its parts (`timing_s/gen`, `old_log_prob`, `update_actor`), the median actions generated
per step, the run's wall time and the load average before it. The default variants decide the row layout (the last
line: tree-packed / per-path step time, measured in this one run); the second protocol's arms (`ARMS2`: forks in
flight, the fork pool for CARL and for GRPO) are compared with GRPO, in this one run, per step and per 1,000
generated actions (docs/carl_vs_grpo_2.md, "Logged per arm"). Accuracy is not looked at.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks import carl_vs_grpo as exp
from benchmarks.carl_vs_grpo_2 import ARMS2
from recipe.carl.tiny import launch
from recipe.carl.tiny.config import DemoConfig
from recipe.carl.tiny.report import read_metrics
from recipe.carl.tiny.trajectory import corpus_search

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any]] = {
    "carl_path": {"algo": "carl", "packing": "path"},
    "carl_tree": {"algo": "carl", "packing": "tree"},
    "grpo": {"algo": "grpo", "packing": "tree"},  # GRPO's rows are single chains: packing does not change them
    **{arm: {**fields, "packing": "tree"} for arm, fields in ARMS2.items() if arm not in ("grpo", "carl")},
}
"""variant -> the `DemoConfig` fields that differ from the first protocol's shared ones."""
DEFAULT_VARIANTS = ("carl_path", "carl_tree", "grpo")
PARTS = ("timing_s/step", "timing_s/gen", "timing_s/old_log_prob", "timing_s/update_actor")


def summarize(rows: list[dict[str, Any]], done: dict[str, Any]) -> dict[str, Any]:
    """Median of each timing part over steps 2 on (step 1 holds warm-up), the run's wall time and load average."""
    later = [r for r in rows if r["step"] >= 2]
    if not later:
        raise ValueError("need at least 2 steps: the first one holds the warm-up")
    medians = {p.split("/")[-1]: statistics.median(r[p] for r in later if p in r) for p in PARTS}
    generated = [r["carl/actions_generated_per_question"] * r["carl/questions"] for r in later if "carl/questions" in r]
    if generated:
        medians["actions_generated"] = statistics.median(generated)
    return {**medians, "wall_s": done["wall_s"], "load_before": round(done["load_before"][0], 2)}


def against_grpo(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each variant's median step time over GRPO's, and its seconds per 1,000 generated actions over GRPO's (the
    median step over the median actions generated per step), all from this one run."""
    if "grpo" not in result:
        return {}
    base = result["grpo"]
    out = {}
    for name, r in result.items():
        if name == "grpo":
            continue
        out[name] = {"step": r["step"] / base["step"]}
        if r.get("actions_generated") and base.get("actions_generated"):
            per_action = (r["step"] / r["actions_generated"]) / (base["step"] / base["actions_generated"])
            out[name]["per_generated_action"] = per_action
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_step", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="RL steps per variant (>= 2)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_step", help="run folders (reused if finished)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS))
    p.add_argument("--lock", help="a file to flock around each run (one heavy job at a time)")
    args = p.parse_args(argv)
    if args.steps < 2:
        raise SystemExit(f"error: --steps {args.steps} must be >= 2 (the first step holds the warm-up).")
    out = args.out.resolve()
    shared = exp.prepare(out, exp.PROTOCOL)
    result: dict[str, Any] = {}
    retriever, _ = corpus_search(shared / "data" / "corpus.jsonl", 2)
    with launch.retriever_server(retriever, 0) as url:
        for name in args.variants:
            demo = {**exp.PROTOCOL.demo, **VARIANTS[name], "steps": args.steps}
            protocol = dataclasses.replace(exp.PROTOCOL, seeds=1, demo=demo, eval_every=args.steps)
            cfg = DemoConfig(**demo, rl_seed=0, test_freq=args.steps)  # `exp.demo_config` with this variant's fields
            with exp.heavy_lock(args.lock):
                run = exp.train(demo["algo"], 0, out / name, shared, f"{url.rstrip('/')}/retrieve", protocol, cfg)
            done = json.loads((run / "done.json").read_text())
            result[name] = summarize(read_metrics(run / "metrics.jsonl"), done)
            print(json.dumps({"variant": name, **result[name]}), flush=True)
    if "carl_tree" in result and "carl_path" in result:
        ratio = result["carl_tree"]["step"] / result["carl_path"]["step"]
        result["tree_over_path_step"] = ratio
        print(f"tree-packed / per-path step time: {ratio:.2f}", file=sys.stdout)
    result["against_grpo"] = against_grpo({k: v for k, v in result.items() if isinstance(v, dict)})
    for name, r in result["against_grpo"].items():
        per_action = f", per generated action {r['per_generated_action']:.2f}" if "per_generated_action" in r else ""
        print(f"{name} / grpo: step time {r['step']:.2f}{per_action}", file=sys.stdout)
    return result


if __name__ == "__main__":
    main()
