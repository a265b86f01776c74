"""The GPU check: one command for whoever holds one GPU for ~10 minutes, printing what a CPU cannot measure.

    python benchmarks/gpu_check.py          # one H100, unattended; prints a report and a SUMMARY block at the end

It needs torch and transformers only (no verl, vLLM, flash-attn or package index): a bare GPU machine with a copy of
this repository runs it. Three parts, each printed as it ends (a run cut short still shows what it finished):

1. **install**: what the start-up check (`recipe.carl.gpu_stack`, run by `main_carl`) says about this machine: its
   driver against torch's CUDA build (PyPI's torch 2.11.0 needs driver >= 580), the GPUs, what differs from `.[gpu]`;
2. **exactness**: tree attention on the GPU (flex attention with the compiled block mask, verl's remove-padding
   layout), fp32, a tiny random Qwen2: log-probs of the trained tokens, packed against per-path rows (the CPU tests
   cover sdpa and flex without compilation);
3. **speed**: `bench_packing.py`'s 7B-shaped workload: token counts over 128 synthetic trees of
   `scripts/run_carl_qwen7b.sh`'s shape, old-log-prob and update passes timed on `--time-trees` of them, with
   Qwen2.5-7B's widths (hidden 3584, 28 heads, 4 KV heads, MLP 18944, vocabulary 152064) but `--layers` of its 28
   layers (default 8: the full model with AdamW states and 28k-token micro-batches does not fit one 80 GB GPU, nor
   the time; both layouts do the same work per token and layer, so the packed/per-path ratio carries over, the
   absolute times do not), bf16, gradient checkpointing, flex attention for both layouts. Also the peak memory and
   the first (compiling) round.

Then the recommendation for the `algorithm.carl.packing` default (`recommend`): `tree` when the packed passes take
<= 0.7x the per-path time on <= 0.5x the tokens and the exactness check passed; otherwise `path`, with the reason.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_packing  # noqa: E402
from recipe.carl import gpu_stack  # noqa: E402

TIME_RATIO_MAX = 0.7
"""Packed passes must take at most this share of the per-path time (docs/packing.md's switch condition)."""
TOKEN_RATIO_MAX = 0.5
"""... on at most this share of the per-path tokens."""
EXACT_TOL = 1e-3
"""Largest |packed - per-path| log-prob of a trained token accepted in the fp32 check (the CPU tests see <= 1e-5;
a token that sees a wrong branch moves by far more)."""


def fields(line: str) -> dict[str, float]:
    """The `key=value` numbers of a `bench_packing` result line (`7B-shape ratio=0.348 time_ratio=...`)."""
    return {k: float(v) for k, v in (part.split("=", 1) for part in line.split()[1:])}


def recommend(token_ratio: float | None, time_ratio: float | None, exact_diff: float | None) -> tuple[str, str]:
    """The `algorithm.carl.packing` default these numbers call for, and why.

    Args:
        token_ratio: packed / per-path tokens of the 7B-shaped step (None: not measured).
        time_ratio: packed / per-path seconds of the old-log-prob + update passes (None: not measured).
        exact_diff: the exactness check's max |dlogp| (None: not measured).

    Returns:
        ("tree" or "path", the reason, naming each condition that failed).
    """
    if token_ratio is None or time_ratio is None:
        return "path", "the 7B-shaped timing did not finish: no GPU measurement to switch on"
    failed = []
    if exact_diff is None or not exact_diff <= EXACT_TOL:
        failed.append(f"the exactness check {'did not run' if exact_diff is None else f'gave {exact_diff:.2e}'} "
                      f"(needs <= {EXACT_TOL:g})")  # fmt: skip
    if not token_ratio <= TOKEN_RATIO_MAX:
        failed.append(f"packed rows hold {token_ratio:.3f}x the per-path tokens (needs <= {TOKEN_RATIO_MAX})")
    if not time_ratio <= TIME_RATIO_MAX:
        failed.append(f"packed passes take {time_ratio:.3f}x the per-path time (needs <= {TIME_RATIO_MAX})")
    if failed:
        return "path", "; ".join(failed)
    return "tree", (
        f"packed passes take {time_ratio:.3f}x the per-path time (<= {TIME_RATIO_MAX}) on {token_ratio:.3f}x the "
        f"tokens (<= {TOKEN_RATIO_MAX}), and agree with per-path rows to {exact_diff:.1e}"
    )


def summary(out: dict, device: str, repeats: int) -> list[str]:
    """The report's last lines: each number that decides something, and the recommendation."""
    lines = [f"device          {device}, torch {torch.__version__}, {out['seconds']:.0f} s in all"]
    problems = len(out["install"] or [])
    lines.append(f"install         {f'{problems} problem(s), listed in part 1' if problems else 'ok'}")
    exact = (
        "not measured" if out["exact"] is None else f"max |dlogp| = {out['exact']:.2e} (fp32; needs <= {EXACT_TOL:g})"
    )
    lines.append(f"exactness       {exact}")
    s = out["speed"]
    if s:
        compile_s = s["first_packed_s"] - s["packed_s"]
        lines += [
            f"tokens          packed / per-path rows = {s['ratio']:.3f} (packed / GRPO's rows = {s['grpo_ratio']:.3f})",
            f"time            packed {s['packed_s']:.2f} s, per-path {s['per_path_s']:.2f} s: "
            f"ratio {s['time_ratio']:.3f} (old-log-prob + update passes, median of {repeats} rounds)",
            f"first round     packed {s['first_packed_s']:.2f} s: ~{compile_s:.0f} s more than later rounds "
            "(compilation: what a run's first packed step adds)",
        ]
        if "peak_gb_packed" in s:
            lines.append(
                f"peak memory     packed {s['peak_gb_packed']:.1f} GB, per-path {s['peak_gb_per_path']:.1f} GB"
            )
    else:
        lines.append("speed           not measured (see part 3)")
    lines.append(f"recommendation  algorithm.carl.packing: {out['recommendation']} ({out['why']})")
    return lines


def _section(title: str) -> float:
    print(f"\n######## {title}", flush=True)
    return time.perf_counter()


def _bench(argv: list[str]) -> dict[str, float]:
    (line,) = bench_packing.main(["--workloads", "7B-shape", *argv])
    return fields(line)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the tests' dry run")
    p.add_argument("--model", default="qwen2.5-7b", help=f"speed part's shape: {', '.join(bench_packing.MODELS)}")
    p.add_argument("--layers", type=int, default=8, help="speed part: layers of the shape (Qwen2.5-7B has 28)")
    p.add_argument("--time-trees", type=int, default=4, help="speed part: trees timed")
    p.add_argument("--count-trees", type=int, default=128, help="speed part: trees counted (a full 7B-script step)")
    p.add_argument("--repeats", type=int, default=2, help="speed part: timed rounds after the warm-up round")
    p.add_argument("--scale", type=float, default=1.0, help="token counts of the synthetic trees (tests: 0.05)")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # unattended runs: a run killed at its time limit keeps its lines
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no GPU; the install check below says why (or pass --device cpu)")
    started = time.perf_counter()
    out: dict = {"install": None, "exact": None, "speed": None}
    device = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    print(f"gpu_check on {device}: torch {torch.__version__}, Python {platform.python_version()}")

    t = _section("1. install: the start-up check of this machine (recipe.carl.gpu_stack, as main_carl runs it)")
    stack = gpu_stack.probe()
    print("\n".join(gpu_stack.report(stack)))
    out["install"] = gpu_stack.problems(stack)
    print(f"({time.perf_counter() - t:.0f} s)")

    cpu = ["--device", "cpu"] if args.device == "cpu" else ["--device", "cuda"]
    t = _section("2. exactness: packed vs per-path log-probs, fp32, tiny random Qwen2, tree attention on this device")
    try:
        exact = _bench([*cpu, "--model", "tiny", "--fp32", "--scale", str(0.1 * args.scale), "--count-trees", "2",
                        "--time-trees", "2", "--repeats", "1"])  # fmt: skip
        out["exact"] = exact["max_abs_logp_diff"]
        verdict = "ok" if out["exact"] <= EXACT_TOL else "FAILED"
        print(f"exactness: max |dlogp| = {out['exact']:.2e} (<= {EXACT_TOL:g}: {verdict})")
    except Exception:
        traceback.print_exc()
    print(f"({time.perf_counter() - t:.0f} s)")

    t = _section(
        f"3. speed: 7B-shaped step ({args.count_trees} trees counted, {args.time_trees} timed), {args.model} "
        f"widths with {args.layers} layers, on {device}"
    )
    try:
        speed = ["--model", args.model, "--layers", str(args.layers), "--time-trees", str(args.time_trees)]
        speed += ["--count-trees", str(args.count_trees), "--repeats", str(args.repeats), "--scale", str(args.scale)]
        out["speed"] = _bench([*cpu, *speed])
    except Exception:
        traceback.print_exc()
    print(f"({time.perf_counter() - t:.0f} s)")

    speed = out["speed"] or {}
    out["recommendation"], out["why"] = recommend(speed.get("ratio"), speed.get("time_ratio"), out["exact"])
    out["seconds"] = time.perf_counter() - started
    print("\n######## SUMMARY")
    print("\n".join(summary(out, device, args.repeats)))
    return out


if __name__ == "__main__":
    main()
