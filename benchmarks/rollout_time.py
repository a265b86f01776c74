"""The rollout-time model (issue 29): the real scheduler, a simulated inference server, GRPO against CARL.

    python -m benchmarks.rollout_time calibrate      # the paper shapes' policy fitted to the paper's Table 2
    python -m benchmarks.rollout_time predict        # every shape x setting: benchmarks/results/rollout_time.json
    python -m benchmarks.rollout_time predict --shapes 7b --seeds 1     # one shape, one seed

What runs for real: `carl_core.grow_tree` and `ForkPlanner` (N0 root rollouts, then N forks, at most K in flight,
the density rule on the entropies the simulated policy returns), one agent-loop worker's trees run concurrently as in
verl's `AgentLoopWorker`, and verl's routing of each request id to one replica (`benchmarks.rollout_sim.Router`): a
CARL tree is one request id, so all its forks go to one replica; each GRPO trajectory is its own.

What is modelled:
- the server (`benchmarks.rollout_sim`): continuous batching, the step time as a function of the sequences in
  flight and their context, prefill per new token, prefix-cache hits (a fork's prefix is cached on its tree's replica),
  KV capacity and preemption; curves per GPU in `SERVERS`, from published vLLM measurements (docs/measurements.md,
  "Rollout time");
- the policy (`Policy`): per action, whether it answers (a hazard that rises with depth), its length in tokens, its
  entropy h (log-normal, with a depth trend), the observation's length, the search tool's latency. The paper shapes'
  hazard and entropy trend are fitted to the paper's Table 2 (`calibrate`); token lengths are stated assumptions
  (`SHAPES`), with a sensitivity table.

Outputs per shape and setting: the step's rollout wall time (simulated seconds), the mean sequences running per
replica, and the tail: the share of the rollout after 90 % of the trees (GRPO: groups) had finished.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.rollout_sim import Replica, Request, Router, ServerModel, VirtualClockLoop, percentile_time
from carl_core import CARLConfig, Draw, ForkPlanner, RolloutTree, Step, grow_tree

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "rollout_time.json"


def _rng(*key: Any) -> random.Random:
    return random.Random(repr(key))


@dataclass(frozen=True)
class Policy:
    """What the simulated policy's actions look like; every draw is seeded by (question, rollout, turn)."""

    prompt_tokens: int = 250
    action_tokens: float = 120.0
    """Mean tokens of a search action (think + query), log-normal with `action_sigma`, at most `max_action_tokens`."""
    answer_tokens: float = 60.0
    action_sigma: float = 0.5
    max_action_tokens: int = 512
    obs_tokens: float = 390.0
    """Mean tokens of a search observation (top-3 passages), normal with sd 20 % of the mean."""
    response_length: int = 12288
    """Token budget of a trajectory after the prompt: a state without room for one more turn overflows."""
    hazard: tuple[float, float] = (0.14, 0.0)
    """(a, b): P(the action at depth d answers) = min(1, a * exp(b * d))."""
    entropy: tuple[float, float, float] = (0.5, 0.6, 0.0)
    """(median, sigma, trend): h ~ log-normal(median * exp(trend * d), sigma)."""
    search_s: float = 0.05
    """Mean latency of one search (exponential)."""

    def answer_probability(self, depth: int) -> float:
        a, b = self.hazard
        return min(1.0, a * math.exp(b * depth))

    def draw(self, question: int, draw: Draw, depth: int) -> tuple[bool, int, float, int]:
        """(answers, action tokens, entropy, observation tokens) of one action."""
        r = _rng(question, draw.rollout, draw.turn)
        answers = r.random() < self.answer_probability(depth)
        mean = self.answer_tokens if answers else self.action_tokens
        tokens = int(min(self.max_action_tokens, max(1, round(r.lognormvariate(0, self.action_sigma) * mean /
                                                                  math.exp(self.action_sigma**2 / 2)))))  # fmt: skip
        median, sigma, trend = self.entropy
        h = median * math.exp(trend * depth) * r.lognormvariate(0, sigma)
        obs = max(1, round(r.gauss(self.obs_tokens, 0.2 * self.obs_tokens)))
        return answers, tokens, h, obs


class SimEnvironment:
    """carl_core's `Environment` for one question: each action is generated on the simulated server."""

    _tokens = itertools.count(10)  # a fresh first token per action: no two samples merge

    def __init__(self, sim: Simulation, question: int, request_id: str, stats: dict[str, int]) -> None:
        self.sim, self.question, self.request_id, self.stats = sim, question, request_id, stats

    async def step(self, tree: RolloutTree, node_id: int, draw: Draw) -> Step:
        policy = self.sim.policy
        depth = tree.nodes[node_id].depth
        path = tree.path(node_id)
        prefix = len(tree.prompt_ids) + sum(len(tree.nodes[v].action.token_ids) +  # type: ignore[union-attr]
                                             len(tree.nodes[v].action.observation_ids) for v in path[1:])  # fmt: skip
        answers, n, h, obs = policy.draw(self.question, draw, depth)
        n = min(n, policy.response_length - (prefix - policy.prompt_tokens))
        if n < 1:
            return Step((), (), finish_reason="context_overflow")
        keys = [(("q", self.question), policy.prompt_tokens)]
        keys += [((self.request_id, v), 0) for v in path[1:]]
        lengths = itertools.accumulate(
            [policy.prompt_tokens]
            + [
                len(tree.nodes[v].action.token_ids) + len(tree.nodes[v].action.observation_ids)  # type: ignore[union-attr]
                for v in path[1:]
            ]  # fmt: skip
        )
        keys = [(key, length) for (key, _), length in zip(keys, lengths, strict=True)]
        request = Request(group=self.request_id, path=keys, prefix=prefix, new_tokens=n)
        await self.sim.router.replica(self.request_id).generate(request)
        self.stats["actions"] += 1
        self.stats["tokens"] += n
        tokens = [next(self._tokens)] + [1] * (n - 1)
        done = answers or depth + 1 >= tree.max_actions
        if done:
            return Step(tokens, [-h] * n, done=True, finish_reason="answer" if answers else None)
        await asyncio.sleep(self.sim.rng.expovariate(1 / policy.search_s) if policy.search_s > 0 else 0.0)
        return Step(tokens, [-h] * n, observation_ids=[2] * obs)

    async def score(self, tree: RolloutTree, leaf_id: int) -> float:
        return float(_rng(self.question, leaf_id).random() < 0.5)


@dataclass
class Simulation:
    """One rollout step on `replicas` simulated replicas."""

    policy: Policy
    server: ServerModel
    replicas: int
    seed: int = 0
    router: Router = field(init=False)
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


def run_step(
    policy: Policy,
    server: ServerModel,
    carl: CARLConfig,
    *,
    algo: str = "carl",
    group: int = 16,
    replicas: int = 8,
    workers: int = 8,
    questions: int = 128,
    seed: int = 0,
) -> dict[str, Any]:
    """One rollout step of `questions` questions: a CARL tree each (`carl`), or a GRPO group of `group` trajectories
    (`algo="grpo"`; T_max from `carl.max_actions`).

    Returns:
        `rollout_s`, `seqs_running_mean` (per replica, time-weighted over the step), `tail_share` (after 90 % of
        the trees or groups), `actions_per_question`, `tokens_per_question`, `busy_share` (per replica), `preempted`,
        `prefix_cached_share`, and `worker_end_s` (each agent-loop worker's finish time).
    """
    if algo not in ("carl", "grpo"):
        raise ValueError(f"algo={algo!r}: use carl or grpo")
    loop = VirtualClockLoop()
    stats = {"actions": 0, "tokens": 0}
    finished: list[float] = []
    worker_end: list[float] = []
    sim = Simulation(policy, server, replicas, seed)
    chain = dataclasses.replace(carl, n0=1, n_forks=0)

    async def question(q: int) -> None:
        prompt = [0] * policy.prompt_tokens
        if algo == "carl":
            env = SimEnvironment(sim, q, f"t{q}", stats)
            tree = RolloutTree(prompt, carl.max_actions, uid=f"t{q}", merge=False)
            await grow_tree(tree, ForkPlanner(carl, random.Random(f"{seed}:{q}")), env)
        else:
            envs = [SimEnvironment(sim, q * 1000 + i, f"t{q}.{i}", stats) for i in range(group)]
            trees = [RolloutTree(prompt, carl.max_actions, uid=f"t{q}.{i}") for i in range(group)]
            await asyncio.gather(*(grow_tree(t, ForkPlanner(chain), e) for t, e in zip(trees, envs, strict=True)))
        finished.append(loop.time())

    async def worker(qs: Sequence[int]) -> None:
        await asyncio.gather(*(question(q) for q in qs))
        worker_end.append(loop.time())

    async def main() -> list[Replica]:
        reps = [Replica(server, f"r{i}") for i in range(replicas)]
        sim.router = Router(reps, seed)
        chunks = [range(w * questions // workers, (w + 1) * questions // workers) for w in range(workers)]
        await asyncio.gather(*(worker(c) for c in chunks))
        for r in reps:
            r.task.cancel()
        return reps

    reps = loop.run_until_complete(main())
    loop.close()
    end = max(finished)
    prefilled, cached = sum(r.prefilled for r in reps), sum(r.cached for r in reps)
    return {
        "rollout_s": end,
        "seqs_running_mean": statistics.mean(r.seq_s / end for r in reps),
        "tail_share": (end - percentile_time(finished, 0.9)) / end,
        "actions_per_question": stats["actions"] / questions,
        "tokens_per_question": stats["tokens"] / questions,
        "busy_share": statistics.mean(r.busy_s / end for r in reps),
        "preempted": sum(r.preempted for r in reps),
        "prefix_cached_share": cached / max(1, cached + prefilled),
        "worker_end_s": sorted(worker_end),
    }


# --------------------------------------------------------------------------------------------------- calibration
#: The paper's Table 2 (Qwen3-4B, actions generated per question, |D_roll|): GRPO with 16 trajectories, CARL-Lite
#: (N0 = 1) and CARL (N0 = 8), N = 16, at T_max 10 and 32.
TABLE2 = {
    ("grpo", 10): 80.9,
    ("lite", 10): 39.8,
    ("carl", 10): 81.8,
    ("grpo", 32): 115.2,
    ("carl", 32): 141.3,
}


def expected_length(hazard: tuple[float, float], t_max: int) -> float:
    """E[actions of one trajectory] under the answer hazard, capped at T_max (no context limit)."""
    policy = Policy(hazard=hazard)
    alive, total = 1.0, 0.0
    for d in range(t_max):
        total += alive
        alive *= 1 - policy.answer_probability(d)
    return total


def fit_hazard(targets: dict[int, float]) -> tuple[float, float]:
    """(a, b) of the hazard that gives GRPO's actions per trajectory at both T_max (a grid, then a finer grid)."""

    def loss(ab: tuple[float, float]) -> float:
        return sum((expected_length(ab, t) / target - 1) ** 2 for t, target in targets.items())

    a0, b0 = min(((a / 200, b / 200) for a in range(1, 200) for b in range(-100, 101)), key=loss)
    fine = [(a0 + i / 4000, b0 + j / 4000) for i in range(-10, 11) for j in range(-10, 11) if a0 + i / 4000 > 0]
    return min(fine, key=loss)


class _InstantEnvironment(SimEnvironment):
    """The simulated policy without a server (shape statistics only)."""

    async def step(self, tree: RolloutTree, node_id: int, draw: Draw) -> Step:
        depth = tree.nodes[node_id].depth
        answers, n, h, obs = self.sim.policy.draw(self.question, draw, depth)
        self.stats["actions"] += 1
        tokens = [next(self._tokens)]
        if answers or depth + 1 >= tree.max_actions:
            return Step(tokens, [-h], done=True, finish_reason="answer" if answers else None)
        return Step(tokens, [-h], observation_ids=[2])


def actions_per_question(policy: Policy, carl: CARLConfig, questions: int, seed: int = 0) -> float:
    """Actions a CARL tree generates per question under `policy` (the real planner, no server)."""
    stats = {"actions": 0, "tokens": 0}
    sim = Simulation(policy, ServerModel(t0=0.0, t1=0.0), 1, seed)

    async def main() -> None:
        for q in range(questions):
            tree = RolloutTree([0], carl.max_actions, uid=f"t{q}")
            await grow_tree(
                tree, ForkPlanner(carl, random.Random(f"{seed}:{q}")), _InstantEnvironment(sim, q, "", stats)
            )

    asyncio.run(main())
    return stats["actions"] / questions


def calibrate(
    questions: int = 200,
    trends: Sequence[float] = tuple(t / 100 for t in range(0, 13)),
    sigmas: Sequence[float] = (0.3, 0.6, 0.9, 1.2),
) -> dict[str, Any]:
    """Fits the policy of the paper shapes to Table 2: the hazard to GRPO's trajectory lengths (exactly), then the
    entropy's spread and depth trend to CARL's and CARL-Lite's actions per question (the real planner, K = 1, least
    squares of the relative errors over a grid)."""
    hazard = fit_hazard({t: TABLE2[("grpo", t)] / 16 for t in (10, 32)})
    runs = {("lite", 10): 1, ("carl", 10): 8, ("carl", 32): 8}
    rows = []
    for sigma, trend in itertools.product(sigmas, trends):
        policy = dataclasses.replace(Policy(), hazard=hazard, entropy=(0.5, sigma, trend))
        got = {key: actions_per_question(policy, CARLConfig(n0=n0, n_forks=16, max_actions=key[1]), questions)
               for key, n0 in runs.items()}  # fmt: skip
        loss = sum((got[key] / TABLE2[key] - 1) ** 2 for key in runs)
        rows.append({"sigma": sigma, "trend": trend, "loss": loss, **{f"{k}_{t}": v for (k, t), v in got.items()}})
    best = min(rows, key=lambda r: r["loss"])
    return {
        "hazard": list(hazard),
        "grpo_per_trajectory": {t: expected_length(hazard, t) for t in (10, 32)},
        "entropy": [0.5, best["sigma"], best["trend"]],
        "fit": best,
        "table2": {f"{k}_{t}": v for (k, t), v in TABLE2.items()},
        "questions": questions,
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------- shapes, servers
#: Per GPU and model: the engine-step curve and capacities (docs/measurements.md, "Rollout time", says where each
#: number comes from). H100, Qwen2.5-7B, bf16, TP 1: t(b) = 6.9 ms + 0.023 ms * b fitted to Lambda's vLLM runs of
#: Llama-3-8B at 1, 10, 80 and 256 sequences (7.05 ms at 1, 12.5-14.9 ms at 256); attention 0.02 ms per 1,000 tokens
#: of context (56 KiB of KV per token at ~3 TB/s); prefill ~45,000 tokens/s; KV pool at gpu_memory_utilization 0.6:
#: 0.6 * 79.2 GiB - 14.25 GiB weights - ~1.5 GiB = 31.7 GiB / 56 KiB = 594k tokens. Qwen3-4B: weights 8 GB, so t0
#: scaled to 4.2 ms (2.7 ms of weight reads + the same 1.5 ms overhead), t1 0.012 ms, 144 KiB of KV per token (0.049
#: ms per 1,000 tokens), prefill ~80,000 tokens/s, 0.6 * 79.2 - 8.0 - 1.5 = 38 GiB / 144 KiB = 277k tokens.
SERVERS: dict[str, ServerModel] = {
    "h100_qwen2.5_7b": ServerModel(t0=6.9e-3, t1=0.023e-3, t2=0.020e-3, prefill_s_per_token=22e-6, kv_tokens=594_000),
    "h100_qwen3_4b": ServerModel(t0=4.2e-3, t1=0.012e-3, t2=0.049e-3, prefill_s_per_token=12.5e-6, kv_tokens=277_000),
}


@dataclass(frozen=True)
class Shape:
    """One run script's step: its tree, batch, GPUs, server and policy."""

    script: str
    server: str
    n0: int
    n_forks: int
    max_actions: int
    questions: int
    grpo_group: int
    policy: Policy
    replicas: int = 8
    workers: int = 8
    """verl's `actor_rollout_ref.rollout.agent.num_workers` default."""


def paper_policy(**tokens: Any) -> Policy:
    """The policy fitted to the paper's Table 2 (`calibrate`, kept in `CALIBRATION`) with the shape's token lengths."""
    return Policy(hazard=CALIBRATION["hazard"], entropy=CALIBRATION["entropy"], **tokens)


#: `python -m benchmarks.rollout_time calibrate` (Table 2; its output is in docs/measurements.md).
CALIBRATION: dict[str, Any] = {"hazard": (0.18575, -0.05575), "entropy": (0.5, 0.9, 0.10)}

#: Token lengths (assumptions, stated in docs/measurements.md): a Search-R1 turn of Qwen2.5-7B-Instruct is ~120 tokens
#: (think + query; answers ~60), at most MAX_ACTION_TOKENS = 512; a Qwen3-4B thinking turn ~600 (answers ~400), at
#: most 2,048; an observation is 3 passages, ~390 tokens; the prompt ~250 tokens; the trajectory budget is
#: MAX_RESPONSE_LENGTH (12,288; 16,384 for Qwen3-4B).
SHAPES: dict[str, Shape] = {
    "7b": Shape("run_carl_qwen7b.sh", "h100_qwen2.5_7b", 8, 16, 32, 128, 16, paper_policy()),
    "7b_lite": Shape("run_carl_lite_qwen7b.sh", "h100_qwen2.5_7b", 1, 16, 32, 128, 16, paper_policy()),
    "qwen3_4b": Shape(
        "run_carl_qwen3_4b.sh",
        "h100_qwen3_4b",
        8,
        16,
        10,
        64,
        16,
        paper_policy(action_tokens=600.0, answer_tokens=400.0, max_action_tokens=2048, response_length=16384),
    ),
}
KS = (1, 2, 4, 8, 16)
"""Forks in flight tried per shape (16 = every fork of N = 16 at once)."""


def predict_shape(name: str, shape: Shape, seeds: int, ks: Sequence[int] = KS, server: ServerModel | None = None):
    """GRPO and CARL at each K on one shape, `seeds` seeds each: mean and range of every output."""
    server = server or SERVERS[shape.server]
    carl = CARLConfig(n0=shape.n0, n_forks=shape.n_forks, max_actions=shape.max_actions)
    common = {"replicas": shape.replicas, "workers": shape.workers, "questions": shape.questions}

    def runs(algo: str, k: int) -> dict[str, Any]:
        cfg = dataclasses.replace(carl, forks_in_flight=k)
        out = [run_step(shape.policy, server, cfg, algo=algo, group=shape.grpo_group, seed=s, **common)
               for s in range(seeds)]  # fmt: skip
        keys = [k for k, v in out[0].items() if isinstance(v, (int, float))]
        return {key: summary([o[key] for o in out]) for key in keys}

    started = time.time()
    result = {"grpo": runs("grpo", 1), "carl": {str(k): runs("carl", k) for k in ks}}
    grpo_s = result["grpo"]["rollout_s"]["mean"]
    ok = [k for k in ks if result["carl"][str(k)]["rollout_s"]["mean"] <= 1.2 * grpo_s]
    return {
        "script": shape.script,
        "server": dataclasses.asdict(server),
        "tree": {"n0": shape.n0, "n_forks": shape.n_forks, "max_actions": shape.max_actions},
        "questions": shape.questions,
        "grpo_group": shape.grpo_group,
        "replicas": shape.replicas,
        "policy": dataclasses.asdict(shape.policy),
        "seeds": seeds,
        "grpo_s": grpo_s,
        "carl_s": {k: v["rollout_s"]["mean"] for k, v in result["carl"].items()},
        "carl_over_grpo": {k: v["rollout_s"]["mean"] / grpo_s for k, v in result["carl"].items()},
        "default_forks_in_flight": min(ok) if ok else None,
        "detail": result,
        "model_seconds": round(time.time() - started, 1),
    }


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def sensitivity(shape: Shape, ks: Sequence[int], seeds: int = 1) -> list[dict[str, Any]]:
    """CARL over GRPO at each K under other plausible step curves (t0, t1 scaled): how much the choice depends on
    the curve."""
    base = SERVERS[shape.server]
    rows = []
    for f0, f1 in itertools.product((0.7, 1.0, 1.5), (0.5, 1.0, 2.0)):
        server = dataclasses.replace(base, t0=base.t0 * f0, t1=base.t1 * f1)
        out = predict_shape("", shape, seeds, ks, server)
        rows.append({"t0_ms": server.t0 * 1e3, "t1_ms": server.t1 * 1e3, "carl_over_grpo": out["carl_over_grpo"]})
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rollout_time", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="fit the paper shapes' policy to Table 2")
    cal.add_argument("--questions", type=int, default=200)
    pre = sub.add_parser("predict", help="every shape x setting; writes the results JSON")
    pre.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    pre.add_argument("--seeds", type=int, default=3)
    pre.add_argument("--out", type=Path, default=RESULTS)
    pre.add_argument("--no-sensitivity", action="store_true")
    args = p.parse_args(argv)
    if args.command == "calibrate":
        out = calibrate(args.questions)
        print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
        return out
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: need at least 1")
    results: dict[str, Any] = {"command": "python -m benchmarks.rollout_time " + " ".join(sys.argv[1:]), "shapes": {}}
    for name in args.shapes:
        print(f"{name}: ...", flush=True)
        results["shapes"][name] = predict_shape(name, SHAPES[name], args.seeds)
        print(json.dumps({k: results["shapes"][name][k] for k in ("grpo_s", "carl_over_grpo")}), flush=True)
    if not args.no_sensitivity and "7b" in args.shapes:
        results["sensitivity_7b"] = sensitivity(SHAPES["7b"], KS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
