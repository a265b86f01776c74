"""The cost of one RL step of the CARL-against-GRPO experiment, per row layout: what chose its settings.

    python -m benchmarks.bench_step [--steps 10] [--out runs/bench_step]

Runs, back to back and with the experiment's settings otherwise (`benchmarks.carl_vs_grpo.PROTOCOL`, seed 0), a few
steps of CARL with per-path rows, CARL with tree-packed rows, and GRPO, through verl's trainer on the CPU, and prints
per variant the median step (steps 2 on: the first holds warm-up) and its parts (`timing_s/gen`, `old_log_prob`,
`update_actor`), the run's wall time, the load average before it, and the last line the ratio that decides the row
layout: tree-packed / per-path step time, measured in this one run. Accuracy is not looked at.
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
from recipe.carl.tiny import launch
from recipe.carl.tiny.report import read_metrics
from recipe.carl.tiny.trajectory import corpus_search

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"carl_path": ("carl", "path"), "carl_tree": ("carl", "tree"), "grpo": ("grpo", "tree")}
"""variant -> (arm, `packing`); GRPO's rows are single chains, so packing does not change them."""
PARTS = ("timing_s/step", "timing_s/gen", "timing_s/old_log_prob", "timing_s/update_actor")


def summarize(rows: list[dict[str, Any]], done: dict[str, Any]) -> dict[str, Any]:
    """Median of each timing part over steps 2 on (step 1 holds warm-up), the run's wall time and load average."""
    later = [r for r in rows if r["step"] >= 2]
    if not later:
        raise ValueError("need at least 2 steps: the first one holds the warm-up")
    medians = {p.split("/")[-1]: statistics.median(r[p] for r in later if p in r) for p in PARTS}
    return {**medians, "wall_s": done["wall_s"], "load_before": round(done["load_before"][0], 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_step", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="RL steps per variant (>= 2)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_step", help="run folders (reused if finished)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
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
            arm, packing = VARIANTS[name]
            demo = {**exp.PROTOCOL.demo, "steps": args.steps, "packing": packing}
            protocol = dataclasses.replace(exp.PROTOCOL, seeds=1, demo=demo, eval_every=args.steps)
            with exp.heavy_lock(args.lock):
                run = exp.train(arm, 0, out / name, shared, f"{url.rstrip('/')}/retrieve", protocol)
            done = json.loads((run / "done.json").read_text())
            result[name] = summarize(read_metrics(run / "metrics.jsonl"), done)
            print(json.dumps({"variant": name, **result[name]}), flush=True)
    if "carl_tree" in result and "carl_path" in result:
        ratio = result["carl_tree"]["step"] / result["carl_path"]["step"]
        result["tree_over_path_step"] = ratio
        print(f"tree-packed / per-path step time: {ratio:.2f}", file=sys.stdout)
    return result


if __name__ == "__main__":
    main()
