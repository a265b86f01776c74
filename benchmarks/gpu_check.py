"""The GPU check: one command for whoever holds one GPU for ~10 minutes, printing what a CPU cannot measure.

    python benchmarks/gpu_check.py          # one H100, unattended; prints a report and a SUMMARY block at the end

It needs torch and transformers only (no verl, vLLM, flash-attn or package index): a bare GPU machine with a copy of
this repository runs it. Four parts, each printed as it ends (a run cut short still shows what it finished):

1. **install**: what the start-up check (`recipe.carl.gpu_stack`, run by `main_carl`) says about this machine: its
   driver against torch's CUDA build (PyPI's torch 2.11.0 needs driver >= 580), the GPUs, what differs from `.[gpu]`;
2. **exactness**: tree attention on the GPU (flex attention with the compiled block mask, verl's remove-padding
   layout), a tiny random Qwen2: log-probs of the trained tokens in fp32, packed against per-path rows (the CPU
   tests cover sdpa and flex without compilation), and, beside it, the gradients of a few parameters under bf16
   autocast (flex attention's backward kernel with the tree mask; relative L2 difference <= `GRAD_TOL`);
3. **recompiles**: `MIN_LENGTHS` packed micro-batches of distinct lengths through flex attention, no-grad and with
   backward, as the engine runs them (`dynamic_lengths`): the graphs dynamo compiles must stay <= `MAX_GRAPHS`.
   Past dynamo's recompile limit (8 per function) flex attention would run uncompiled and build the whole score
   matrix, about 90 GB at 28k tokens: the run would fail in its first step;
4. **speed**: `bench_packing.py`'s 7B-shaped workload: token counts over 128 synthetic trees of
   `scripts/run_carl_qwen7b.sh`'s shape, old-log-prob and update passes timed on `--time-trees` of them, with
   Qwen2.5-7B's widths (hidden 3584, 28 heads, 4 KV heads, MLP 18944, vocabulary 152064) but `--layers` of its 28
   layers (default 8: the full model with AdamW states and 28k-token micro-batches does not fit one 80 GB GPU, nor
   the time; both layouts do the same work per token and layer, so the packed/per-path ratio carries over, the
   absolute times do not), bf16, gradient checkpointing, flex attention for both layouts. Also the peak memory and
   the first (compiling) round.

Then the recommendation for the `algorithm.carl.packing` default (`recommend`): `tree` when the packed passes take
<= 0.7x the per-path time on <= 0.5x the tokens and the exactness, gradient and recompile checks passed; otherwise
`path`, with the reason. The exit status is 1 when one of those three checks failed or did not run.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_packing  # noqa: E402
from recipe.carl import gpu_stack  # noqa: E402
from recipe.carl.packing.attention import dynamic_lengths, logits_from_predecessors  # noqa: E402

TIME_RATIO_MAX = 0.7
"""Packed passes must take at most this share of the per-path time (docs/packing.md's switch condition)."""
TOKEN_RATIO_MAX = 0.5
"""... on at most this share of the per-path tokens."""
EXACT_TOL = 1e-3
"""Largest |packed - per-path| log-prob of a trained token accepted in the fp32 check (the CPU tests see <= 1e-5;
a token that sees a wrong branch moves by far more)."""
GRAD_TOL = 5e-2
"""Largest relative L2 difference |g_packed - g_path| / |g_path| of a checked parameter's gradient under bf16 autocast.
On the CPU (sdpa, the 7B-shaped trees at scales 0.1 and 0.5) bf16 gave 3.5e-3 to 7.4e-3 and fp32 <= 6.4e-7; a mask
that lets branches see each other gave 0.32 to 0.85."""
GRAD_PARAMS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "lm_head.weight",
)
"""The parameters whose gradients are compared (keys and queries take theirs through the attention)."""
MIN_LENGTHS = 12
"""Distinct packed lengths the recompile check runs (dynamo's `recompile_limit` is 8)."""
MAX_GRAPHS = 4
"""Most graphs dynamo may compile in the recompile check: with dynamic sizes, one for the block mask (compiled on a
GPU, built without grad) and one for flex attention per grad mode, 3 on a GPU, 1 on the CPU (no flex backward
there), and one to spare. A recompile per length would pass it within the check's 12 lengths."""


def fields(line: str) -> dict[str, float]:
    """The `key=value` numbers of a `bench_packing` result line (`7B-shape ratio=0.348 time_ratio=...`)."""
    return {k: float(v) for k, v in (part.split("=", 1) for part in line.split()[1:])}


def recommend(
    token_ratio: float | None,
    time_ratio: float | None,
    exact_diff: float | None,
    grad_diff: float | None,
    graphs: int | None,
) -> tuple[str, str]:
    """The `algorithm.carl.packing` default these numbers call for, and why.

    Args:
        token_ratio: packed / per-path tokens of the 7B-shaped step (None: not measured).
        time_ratio: packed / per-path seconds of the old-log-prob + update passes (None: not measured).
        exact_diff: the exactness check's max |dlogp| (None: not measured).
        grad_diff: the gradient check's largest relative difference (None: not measured).
        graphs: graphs compiled in the recompile check (None: not measured).

    Returns:
        ("tree" or "path", the reason, naming each condition that failed).
    """
    if token_ratio is None or time_ratio is None:
        return "path", "the 7B-shaped timing did not finish: no GPU measurement to switch on"
    failed = check_failures(exact_diff, grad_diff, graphs)
    if not token_ratio <= TOKEN_RATIO_MAX:
        failed.append(f"packed rows hold {token_ratio:.3f}x the per-path tokens (needs <= {TOKEN_RATIO_MAX})")
    if not time_ratio <= TIME_RATIO_MAX:
        failed.append(f"packed passes take {time_ratio:.3f}x the per-path time (needs <= {TIME_RATIO_MAX})")
    if failed:
        return "path", "; ".join(failed)
    return "tree", (
        f"packed passes take {time_ratio:.3f}x the per-path time (<= {TIME_RATIO_MAX}) on {token_ratio:.3f}x the "
        f"tokens (<= {TOKEN_RATIO_MAX}), agree with per-path rows to {exact_diff:.1e} (gradients {grad_diff:.1e}), "
        f"and {graphs} graphs compiled for {MIN_LENGTHS} lengths"
    )


def check_failures(exact_diff: float | None, grad_diff: float | None, graphs: int | None) -> list[str]:
    """Each of the exactness, gradient and recompile checks that failed or did not run, with its limit."""
    failed = []
    if exact_diff is None or not exact_diff <= EXACT_TOL:
        failed.append(f"the exactness check {'did not run' if exact_diff is None else f'gave {exact_diff:.2e}'} "
                      f"(needs <= {EXACT_TOL:g})")  # fmt: skip
    if grad_diff is None or not grad_diff <= GRAD_TOL:
        failed.append(f"the gradient check {'did not run' if grad_diff is None else f'gave {grad_diff:.2e}'} "
                      f"(needs <= {GRAD_TOL:g})")  # fmt: skip
    if graphs is None or not graphs <= MAX_GRAPHS:
        failed.append(
            "the recompile check did not run"
            if graphs is None
            else f"{graphs} graphs compiled for {MIN_LENGTHS} packed lengths (needs <= {MAX_GRAPHS}): lengths "
            "recompile, and past dynamo's limit flex attention runs uncompiled (~90 GB of scores at 28k tokens)"
        )
    return failed


def summary(out: dict, device: str, repeats: int) -> list[str]:
    """The report's last lines: each number that decides something, and the recommendation."""
    lines = [f"device          {device}, torch {torch.__version__}, {out['seconds']:.0f} s in all"]
    problems = len(out["install"] or [])
    lines.append(f"install         {f'{problems} problem(s), listed in part 1' if problems else 'ok'}")
    exact = (
        "not measured" if out["exact"] is None else f"max |dlogp| = {out['exact']:.2e} (fp32; needs <= {EXACT_TOL:g})"
    )
    lines.append(f"exactness       {exact}")
    grads = out["grads"]
    measured = f"max relative |dg| = {grads:.2e} (bf16 autocast; needs <= {GRAD_TOL:g})" if grads is not None else ""
    lines.append(f"gradients       {measured or 'not measured'}")
    g = out["graphs"]
    lines.append(
        "graphs          not measured"
        if g is None
        else f"graphs          {g['graphs']} for {g['lengths']} packed lengths x {g['modes']} grad mode(s) "
        f"(needs <= {MAX_GRAPHS})"
    )
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
        lines.append("speed           not measured (see part 4)")
    lines.append(f"recommendation  algorithm.carl.packing: {out['recommendation']} ({out['why']})")
    return lines


MICRO_BATCH_TOKENS = (2048 + 12288) * 2
"""MAX_TOKENS_PER_GPU of scripts/run_carl_qwen7b.sh: a micro-batch's tokens."""


def _gradients(model, rows: list, attn: str, device: str) -> dict[str, torch.Tensor]:
    """`GRAD_PARAMS`' gradients of the trained tokens' mean log-prob over `rows`, bf16 autocast (verl's forward)."""
    model.zero_grad(set_to_none=True)
    trained = sum(sum(r.response_mask) for r in rows)
    for batch in bench_packing.micro_batches(rows, MICRO_BATCH_TOKENS):
        with dynamic_lengths():
            ids, pos, mask, source = bench_packing.model_inputs(batch, True, attn, device)
            with logits_from_predecessors(model, lambda s=source: s), torch.autocast(device, dtype=torch.bfloat16):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            index, labels = bench_packing.response_positions(batch, True, ids.shape[-1])
            flat = logits.view(-1, logits.shape[-1])[index.to(device)].float()
            logp = torch.log_softmax(flat, -1).gather(-1, labels.to(device)[:, None])
            (-logp.sum() / trained).backward()
    params = dict(model.named_parameters())
    return {name: params[name].grad.detach().float().cpu() for name in GRAD_PARAMS}


def gradient_check(device: str, scale: float) -> float:
    """Largest relative L2 difference of `GRAD_PARAMS`' gradients, packed against per-path rows (2 trees, a tiny
    random Qwen2 in fp32 under bf16 autocast); flex attention on a GPU, sdpa on the CPU (no flex backward there)."""
    attn = "flex_attention" if device == "cuda" else "sdpa"
    trees, _ = bench_packing.shaped_trees(2, scale=scale)
    layouts = bench_packing.layouts_for(trees, MICRO_BATCH_TOKENS)
    model = bench_packing.build_model("tiny", device, False, attn)
    grads = {name: _gradients(model, rows, attn, device) for name, rows in layouts.items()}
    return max(
        float((grads["packed"][k] - grads["per-path"][k]).norm() / grads["per-path"][k].norm()) for k in GRAD_PARAMS
    )


def graph_check(device: str, scale: float, dynamic: bool = True) -> dict[str, int]:
    """Graphs dynamo compiles for `MIN_LENGTHS` packed micro-batches of distinct lengths through flex attention.

    The micro-batches are the first 1, 2, ... `MIN_LENGTHS` packed rows of as many 7B-shaped trees (each longer than
    the last), run no-grad, then with backward (a GPU only: flex attention has no CPU backward), as the engine runs
    them: inside `dynamic_lengths` unless `dynamic` is False (dynamo's default). Dynamo starts from nothing.

    Returns:
        {"graphs": graphs compiled, "lengths": distinct lengths, "modes": grad modes run}.
    """
    trees, _ = bench_packing.shaped_trees(MIN_LENGTHS, scale=scale)
    rows = bench_packing.layouts_for(trees, MICRO_BATCH_TOKENS)["packed"]
    batches = [rows[:k] for k in range(1, MIN_LENGTHS + 1)]
    model = bench_packing.build_model("tiny", device, False, "flex_attention")
    modes = (False, True) if device == "cuda" else (False,)
    torch._dynamo.reset()
    counters.clear()
    for train in modes:
        model.train(train)
        for batch in batches:
            scope = dynamic_lengths() if dynamic else contextlib.nullcontext()
            autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
            with scope, torch.set_grad_enabled(train), autocast:
                ids, pos, mask, source = bench_packing.model_inputs(batch, True, "flex_attention", device)
                with logits_from_predecessors(model, lambda s=source: s):
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                if train:
                    logits.float().mean().backward()
    lengths = {sum(len(r.ids) for r in b) for b in batches}
    return {"graphs": int(counters["stats"]["unique_graphs"]), "lengths": len(lengths), "modes": len(modes)}


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
    out: dict = {"install": None, "exact": None, "grads": None, "graphs": None, "speed": None}
    device = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    print(f"gpu_check on {device}: torch {torch.__version__}, Python {platform.python_version()}")

    t = _section("1. install: the start-up check of this machine (recipe.carl.gpu_stack, as main_carl runs it)")
    stack = gpu_stack.probe()
    print("\n".join(gpu_stack.report(stack)))
    out["install"] = gpu_stack.problems(stack)
    print(f"({time.perf_counter() - t:.0f} s)")

    cpu = ["--device", "cpu"] if args.device == "cpu" else ["--device", "cuda"]
    t = _section("2. exactness: packed vs per-path log-probs (fp32) and gradients (bf16), tiny random Qwen2")
    try:
        exact = _bench([*cpu, "--model", "tiny", "--fp32", "--scale", str(0.1 * args.scale), "--count-trees", "2",
                        "--time-trees", "2", "--repeats", "1"])  # fmt: skip
        out["exact"] = exact["max_abs_logp_diff"]
        verdict = "ok" if out["exact"] <= EXACT_TOL else "FAILED"
        print(f"exactness: max |dlogp| = {out['exact']:.2e} (<= {EXACT_TOL:g}: {verdict})")
    except Exception:
        traceback.print_exc()
    try:
        out["grads"] = gradient_check(args.device, 0.1 * args.scale)
        verdict = "ok" if out["grads"] <= GRAD_TOL else "FAILED"
        print(f"gradients: max relative |dg| = {out['grads']:.2e} over {len(GRAD_PARAMS)} parameters, bf16 autocast "
              f"(<= {GRAD_TOL:g}: {verdict})")  # fmt: skip
    except Exception:
        traceback.print_exc()
    print(f"({time.perf_counter() - t:.0f} s)")

    t = _section(f"3. recompiles: {MIN_LENGTHS} packed lengths through flex attention, as the engine runs them")
    try:
        out["graphs"] = graph_check(args.device, 0.1 * args.scale)
        g = out["graphs"]
        verdict = "ok" if g["graphs"] <= MAX_GRAPHS else "FAILED: a recompile storm"
        print(f"recompiles: {g['graphs']} graphs for {g['lengths']} lengths x {g['modes']} grad mode(s) "
              f"(<= {MAX_GRAPHS}: {verdict})")  # fmt: skip
    except Exception:
        traceback.print_exc()
    print(f"({time.perf_counter() - t:.0f} s)")

    t = _section(
        f"4. speed: 7B-shaped step ({args.count_trees} trees counted, {args.time_trees} timed), {args.model} "
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
    graphs = (out["graphs"] or {}).get("graphs")
    out["recommendation"], out["why"] = recommend(
        speed.get("ratio"), speed.get("time_ratio"), out["exact"], out["grads"], graphs
    )
    out["failed"] = check_failures(out["exact"], out["grads"], graphs)
    out["seconds"] = time.perf_counter() - started
    print("\n######## SUMMARY")
    print("\n".join(summary(out, device, args.repeats)))
    return out


if __name__ == "__main__":
    if main()["failed"]:
        sys.exit(1)
