"""The rollout-time model (issue 29): the real scheduler, a simulated inference server, GRPO against CARL.

    python -m benchmarks.rollout_time calibrate      # the paper shapes' policy fitted to the paper's Table 2
    python -m benchmarks.rollout_time predict        # every shape x setting: benchmarks/results/rollout_time.json
    python -m benchmarks.rollout_time predict --shapes 7b --seeds 1     # one shape, one seed
    python -m benchmarks.rollout_time pool           # the step-level fork pool at the 7B shape, into the same JSON

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.rollout_sim import Replica, Request, Router, ServerModel, VirtualClockLoop, percentile_time
from carl_core import CARLConfig, Draw, ForkPlanner, RolloutTree, Step, grow_tree
from recipe.carl.in_flight import InFlight, TailBoost, summarize
from recipe.carl.pool import ForkPool, PoolSettings, grow_pooled

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

    def __init__(self, sim: Simulation, question: int, request_id: str, worker: int = 0) -> None:
        self.sim, self.question, self.request_id, self.worker = sim, question, request_id, worker

    async def step(self, tree: RolloutTree, node_id: int, draw: Draw) -> Step:
        policy = self.sim.policy
        depth = tree.nodes[node_id].depth
        # Prefix-cache keys: the prompt (shared by the question's trees on a replica), then each state of the path.
        lengths = [len(tree.prompt_ids)]
        keys: list[tuple[Any, int]] = [(("q", self.question), lengths[0])]
        for v in tree.path(node_id)[1:]:
            action = tree.nodes[v].action
            assert action is not None
            lengths.append(lengths[-1] + len(action.token_ids) + len(action.observation_ids))
            keys.append(((self.request_id, v), lengths[-1]))
        answers, n, h, obs = policy.draw(self.question, draw, depth)
        n = min(n, policy.response_length - (lengths[-1] - lengths[0]))
        if n < 1:
            return Step((), (), finish_reason="context_overflow")
        request = Request(group=self.request_id, path=keys, prefix=lengths[-1], new_tokens=n)
        counter = self.sim.in_flight[self.worker]
        counter.change(0, +1)
        tokens = await self.generate(tree, node_id, request, draw)
        counter.change(0, -1)
        self.sim.actions += 1
        self.sim.tokens += n
        if answers or depth + 1 >= tree.max_actions:
            return Step(tokens, [-h] * n, done=True, finish_reason="answer" if answers else None)
        return Step(tokens, [-h] * n, observation_ids=await self.observe(draw, obs))

    async def generate(self, tree: RolloutTree, node_id: int, request: Request, draw: Draw) -> list[int]:
        """The action's tokens, generated on the simulated server (`benchmarks.rollout_time_cpu`: on vLLM)."""
        await self.sim.router.replica(self.request_id).generate(request)
        return [next(self._tokens)] + [1] * (request.new_tokens - 1)

    async def observe(self, draw: Draw, tokens: int) -> list[int]:
        """A search's observation of `tokens` tokens, after the search tool's latency."""
        search_s = self.sim.policy.search_s
        latency = _rng("search", self.question, draw.rollout, draw.turn).expovariate(1 / search_s) if search_s else 0
        await asyncio.sleep(latency)
        return [2] * tokens

    async def score(self, tree: RolloutTree, leaf_id: int) -> float:
        return float(_rng("reward", self.question, leaf_id).random() < 0.5)


@dataclass
class Simulation:
    """One rollout step's simulated servers, router and counters."""

    policy: Policy
    server: ServerModel
    replicas: int
    workers: int
    seed: int = 0
    actions: int = 0
    tokens: int = 0
    packed_tokens: int = 0
    """Tokens an update processes with tree-packed rows: each tree's prompt and every action and observation once."""
    path_tokens: int = 0
    """... with one row per leaf path (every leaf; GRPO's rows): the prompt and the whole path per leaf."""
    router: Router = field(init=False)
    in_flight: list[InFlight] = field(init=False)

    def __post_init__(self) -> None:
        self.in_flight = [InFlight(clock=asyncio.get_event_loop().time) for _ in range(self.workers)]


async def grow_step(
    sim: Simulation,
    carl: CARLConfig,
    algo: str,
    group: int,
    questions: int,
    env: Callable[[Simulation, int, str, int], SimEnvironment] = SimEnvironment,
    prompt: Callable[[int], list[int]] | None = None,
    tail: tuple[int, float] | None = None,
    pool: PoolSettings | None = None,
) -> list[float]:
    """One rollout step's trees (CARL) or groups (GRPO), each agent-loop worker's concurrently, as verl's
    `AgentLoopWorker` runs its share of the batch; returns each question's (finish time, worker).

    Args:
        env: makes a question's environment from (simulation, question key, request id, worker).
        prompt: a question's prompt tokens (default: `policy.prompt_tokens` zeros).
        tail: the straggler boost (`recipe.carl.in_flight.TailBoost`): (forks in flight, share of trees).
        pool: the step-level fork pool (`recipe.carl.pool`), one per worker as in the agent loop: its real barrier
            and allocation (GRPO: `pool.group` trajectories per question on average, `group` unused).
    """
    if algo not in ("carl", "grpo"):
        raise ValueError(f"algo={algo!r}: use carl or grpo")
    loop, finished = asyncio.get_running_loop(), []
    chain = dataclasses.replace(carl, n0=1, n_forks=0)
    boosts = [TailBoost(*tail) for _ in range(sim.workers)] if tail else []
    pools = [ForkPool(pool, pool.group or carl.n_forks) for _ in range(sim.workers)] if pool else []

    async def question(q: int, w: int) -> None:
        prompt_ids = prompt(q) if prompt else [0] * sim.policy.prompt_tokens
        if pools:  # joined before the first await, as the agent loop does
            pools[w].join(q)
            tree = RolloutTree(prompt_ids, carl.max_actions, uid=f"t{q}", merge=False)
            boost = boosts[w] if boosts and algo == "carl" else None
            config, rng = (chain if algo == "grpo" else carl), random.Random(f"{sim.seed}:{q}")
            tail_of = boost.join() if boost else None
            await grow_pooled(tree, env(sim, q, f"t{q}", w), pools[w], q, config, rng, algo == "grpo", tail=tail_of)
            if boost:
                boost.end()
            trees = [tree]
        elif algo == "carl":
            tree = RolloutTree(prompt_ids, carl.max_actions, uid=f"t{q}", merge=False)
            planner, boost = ForkPlanner(carl, random.Random(f"{sim.seed}:{q}")), boosts[w] if boosts else None
            await grow_tree(tree, planner, env(sim, q, f"t{q}", w), tail=boost.join() if boost else None)
            if boost:
                boost.end()
            trees = [tree]
        else:
            trees = [RolloutTree(prompt_ids, carl.max_actions, uid=f"t{q}.{i}") for i in range(group)]
            envs = [env(sim, q * 1000 + i, f"t{q}.{i}", w) for i in range(group)]
            await asyncio.gather(*(grow_tree(t, ForkPlanner(chain), e) for t, e in zip(trees, envs, strict=True)))
        finished.append((loop.time(), w))
        for t in trees:
            sim.packed_tokens += len(t.prompt_ids) + sum(
                len(n.action.token_ids) + len(n.action.observation_ids) for n in t.nodes if n.action
            )
            sim.path_tokens += sum(len(t.prefix_ids(leaf)) for leaf in t.leaves())

    await asyncio.gather(*(question(q, q * sim.workers // questions) for q in range(questions)))
    return finished


def step_outputs(sim: Simulation, finished: Sequence[tuple[float, int]], start: float, questions: int) -> dict:
    """What a step measured: its duration, sequences in flight per worker (each over its own span, as the trainer
    sees it: until its last tree ends), the tail, actions and tokens."""
    times = [t for t, _ in finished]
    end = max(times) - start
    worker_end = {w: max(t for t, v in finished if v == w) for _, w in finished}
    ends = [summarize(c.steps.get(0, []), worker_end[w]) for w, c in enumerate(sim.in_flight) if w in worker_end]
    return {
        "rollout_s": end,
        "seqs_in_flight_mean": statistics.mean(m for m, _ in ends),
        "seqs_in_flight_min": min(low for _, low in ends),
        "tail_share": (max(times) - percentile_time(times, 0.9)) / end,
        "actions_per_question": sim.actions / questions,
        "tokens_per_question": sim.tokens / questions,
        "update_tokens_tree": sim.packed_tokens,
        "update_tokens_path": sim.path_tokens,
    }


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
    tail: tuple[int, float] | None = None,
    pool: PoolSettings | None = None,
) -> dict[str, Any]:
    """One simulated rollout step of `questions` questions: a CARL tree each (`carl`), or a GRPO group of `group`
    trajectories (`algo="grpo"`; T_max from `carl.max_actions`), dealt to `workers` agent-loop workers; `tail`: the
    straggler boost, (forks in flight, share of a worker's trees), and `pool` the step-level fork pool, as `grow_step`.

    Returns:
        `step_outputs` (`rollout_s`; `seqs_in_flight_mean` and `seqs_in_flight_min` per worker, as the trainer logs
        them: `recipe.carl.in_flight`; `tail_share`, the share of the step after 90 % of the trees or groups had
        finished; `actions_per_question`, `tokens_per_question`) and, per replica, `seqs_running_mean` (time-weighted)
        and `busy_share`; `preempted`, `prefix_cached_share`.
    """
    loop = VirtualClockLoop()
    asyncio.set_event_loop(loop)
    sim = Simulation(policy, server, replicas, workers, seed)

    async def main() -> tuple[list[Replica], list[float]]:
        reps = [Replica(server, f"r{i}") for i in range(replicas)]
        sim.router = Router(reps, seed)
        finished = await grow_step(sim, carl, algo, group, questions, tail=tail, pool=pool)
        for r in reps:
            r.task.cancel()
        return reps, finished

    try:
        reps, finished = loop.run_until_complete(main())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    out = step_outputs(sim, finished, 0.0, questions)
    prefilled, cached = sum(r.prefilled for r in reps), sum(r.cached for r in reps)
    return {
        **out,
        "seqs_running_mean": statistics.mean(r.seq_s / out["rollout_s"] for r in reps),
        "busy_share": statistics.mean(r.busy_s / out["rollout_s"] for r in reps),
        "preempted": sum(r.preempted for r in reps),
        "prefix_cached_share": cached / max(1, cached + prefilled),
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
        self.sim.actions += 1
        tokens = [next(self._tokens)]
        if answers or depth + 1 >= tree.max_actions:
            return Step(tokens, [-h], done=True, finish_reason="answer" if answers else None)
        return Step(tokens, [-h], observation_ids=[2])


def actions_per_question(policy: Policy, carl: CARLConfig, questions: int, seed: int = 0) -> float:
    """Actions a CARL tree generates per question under `policy` (the real planner, no server)."""

    async def main() -> float:
        sim = Simulation(policy, ServerModel(t0=0.0, t1=0.0), 1, 1, seed)
        for q in range(questions):
            tree = RolloutTree([0], carl.max_actions, uid=f"t{q}")
            planner = ForkPlanner(carl, random.Random(f"{seed}:{q}"))
            await grow_tree(tree, planner, _InstantEnvironment(sim, q, ""))
        return sim.actions / questions

    return asyncio.run(main())


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
"""Forks in flight tried per shape (16 = every fork of N = 16 at once, as soon as the rule lets it start)."""
ACTIONS_MARGIN = 0.05
"""Fork fidelity (issue 29 item 5): K > 1 starts forks before earlier ones have ended, so they land nearer the root
and roll out longer; a K whose actions per question exceed K = 1's by more than this share no longer grows Alg. 1's
trees (`benchmarks.fork_fidelity.MARGINS["actions_generated_ratio"]`, the margin fixed before measuring)."""
DEFAULT_RULE = (
    "among the K whose predicted actions per question are within ACTIONS_MARGIN (5 %) of K = 1's (fork fidelity): "
    "the smallest whose predicted CARL rollout is <= 1.2x GRPO's; if none is, the one with the shortest rollout"
)


def choose_default(ratios: dict[int, float], actions: dict[int, float]) -> int:
    """`DEFAULT_RULE` over {K: CARL / GRPO rollout time} and {K: actions per question} (both with K = 1)."""
    base = actions[min(actions)]  # K = 1's, Alg. 1 (the smallest K tried)
    faithful = {k: r for k, r in ratios.items() if actions[k] <= (1 + ACTIONS_MARGIN) * base}
    ok = [k for k, r in faithful.items() if r <= 1.2]
    if ok:
        return min(ok)
    return min(faithful, key=lambda k: (faithful[k], k))


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def _runs(
    shape: Shape,
    server: ServerModel,
    algo: str,
    k: int,
    seeds: int,
    group: int | None = None,
    tail: tuple[int, float] | None = None,
    pool: PoolSettings | None = None,
) -> dict:
    carl = CARLConfig(n0=shape.n0, n_forks=shape.n_forks, max_actions=shape.max_actions, forks_in_flight=k)
    out = [
        run_step(shape.policy, server, carl, algo=algo, group=group or shape.grpo_group, replicas=shape.replicas,
                 workers=shape.workers, questions=shape.questions, seed=seed, tail=tail, pool=pool)
        for seed in range(seeds)
    ]  # fmt: skip
    return {key: _summary([o[key] for o in out]) for key in out[0]}


def predict_shape(shape: Shape, seeds: int, ks: Sequence[int] = KS, server: ServerModel | None = None) -> dict:
    """GRPO (the script's group, and as many trajectories as a tree has leaves) and CARL at each K on one shape,
    `seeds` seeds each: the mean and range over seeds of every output, the ratios, and the default K."""
    server = server or SERVERS[shape.server]
    started = time.time()
    grpo = _runs(shape, server, "grpo", 1, seeds)
    carl = {k: _runs(shape, server, "carl", k, seeds) for k in ks}
    grpo_s = grpo["rollout_s"]["mean"]
    ratios = {k: v["rollout_s"]["mean"] / grpo_s for k, v in carl.items()}
    actions = {k: v["actions_per_question"]["mean"] for k, v in carl.items()}
    return {
        "script": shape.script,
        "server": dataclasses.asdict(server),
        "tree": {"n0": shape.n0, "n_forks": shape.n_forks, "max_actions": shape.max_actions},
        "questions": shape.questions,
        "grpo_group": shape.grpo_group,
        "replicas": shape.replicas,
        "workers": shape.workers,
        "policy": dataclasses.asdict(shape.policy),
        "seeds": seeds,
        "grpo_s": grpo_s,
        "carl_s": {str(k): v["rollout_s"]["mean"] for k, v in carl.items()},
        "carl_over_grpo": {str(k): r for k, r in ratios.items()},
        "default_forks_in_flight": choose_default(ratios, actions),
        "actions_over_k1": {str(k): a / actions[1] for k, a in actions.items()},
        "default_rule": DEFAULT_RULE,
        "detail": {"grpo": grpo, "carl": {str(k): v for k, v in carl.items()}},
        "model_seconds": round(time.time() - started, 1),
    }


#: GPU-hours of an update (`cost`): H100 SXM's dense bf16 peak (NVIDIA's datasheet), the parameters of each server's
#: model, and the model-FLOPs utilisation assumed for verl's FSDP update (a stated assumption: 0.35, with 0.25 and
#: 0.45 beside it). An update costs 8 P FLOPs per token: the old log-probs' forward (2 P) and the actor's forward and
#: backward (6 P); no reference model (the scripts set `use_kl_loss=False`), attention's own FLOPs left out.
H100_BF16_FLOPS = 989e12
PARAMS = {"h100_qwen2.5_7b": 7.6e9, "h100_qwen3_4b": 4.0e9}
MFU = (0.25, 0.35, 0.45)


def update_seconds(tokens: float, params: float, gpus: int, mfu: float) -> float:
    """The update of a step that processes `tokens` tokens: 8 P FLOPs each, over `gpus` GPUs at `mfu` of the peak."""
    return 8 * params * tokens / (gpus * H100_BF16_FLOPS * mfu)


def cost(shape: Shape, out: dict[str, Any]) -> dict[str, Any]:
    """Estimated GPU-hours per 100 steps at the shape, for GRPO and CARL at K = 1 and at the default K, with each
    layout of training rows (CARL: `path`, an upper bound since a row is cut after its last new trained action, and
    `tree`; GRPO: its trajectories): 100 x GPUs x (rollout + update) / 3600, the update at each of `MFU`."""
    gpus, params = shape.replicas, PARAMS[shape.server]
    settings = {"grpo": out["detail"]["grpo"], "carl_k1": out["detail"]["carl"]["1"]}
    settings[f"carl_k{out['default_forks_in_flight']}"] = out["detail"]["carl"][str(out["default_forks_in_flight"])]
    rows = {}
    for name, d in settings.items():
        carl_layouts = {"path": "update_tokens_path", "tree": "update_tokens_tree"}
        layouts = {"trajectories": "update_tokens_path"} if name == "grpo" else carl_layouts
        rollout = d["rollout_s"]["mean"]
        for layout, key in layouts.items():
            tokens = d[key]["mean"]
            hours = {str(m): 100 * gpus * (rollout + update_seconds(tokens, params, gpus, m)) / 3600 for m in MFU}
            rows[f"{name}_{layout}"] = {"rollout_s": rollout, "update_tokens": tokens,
                                        "update_s": update_seconds(tokens, params, gpus, MFU[1]),
                                        "gpu_hours_per_100_steps": hours}  # fmt: skip
    return {"gpus": gpus, "params": params, "peak_flops": H100_BF16_FLOPS, "rows": rows}


TAIL_GRID = [(k, share) for k in (8, 16) for share in (0.1, 0.25, 0.5)]
"""The straggler boosts tried (`recipe.carl.in_flight.TailBoost`: forks in flight, share of a worker's trees)."""
TAIL_RULE = (
    "at the 7B shape's default K: among the boosts of TAIL_GRID whose predicted actions per question stay within "
    "ACTIONS_MARGIN of K = 1's, the one with the shortest predicted rollout, if it is at least 3 % shorter than "
    "without a boost; otherwise none"
)


def tail_study(shape: Shape, seeds: int, k: int, k1_actions: float) -> dict[str, Any]:
    """CARL at K with each boost of `TAIL_GRID`: rollout time, tail share, sequences in flight and actions per
    question, and `TAIL_RULE`'s choice (None: no boost); `k1_actions`: K = 1's actions per question."""
    server = SERVERS[shape.server]
    plain = _runs(shape, server, "carl", k, seeds)
    rows = []
    for boost_k, share in TAIL_GRID:
        d = _runs(shape, server, "carl", k, seeds, tail=(boost_k, share))
        rows.append({"tail_forks_in_flight": boost_k, "tail_share": share, "rollout_s": d["rollout_s"],
                     "tail_share_of_step": d["tail_share"], "seqs_in_flight_min": d["seqs_in_flight_min"],
                     "actions_over_k1": d["actions_per_question"]["mean"] / k1_actions})  # fmt: skip
    faithful = [r for r in rows if r["actions_over_k1"] <= 1 + ACTIONS_MARGIN]
    best = min(faithful, key=lambda r: r["rollout_s"]["mean"]) if faithful else None
    chosen = best if best and best["rollout_s"]["mean"] <= 0.97 * plain["rollout_s"]["mean"] else None
    none = {"rollout_s": plain["rollout_s"], "tail_share_of_step": plain["tail_share"],
            "seqs_in_flight_min": plain["seqs_in_flight_min"],
            "actions_over_k1": plain["actions_per_question"]["mean"] / k1_actions}  # fmt: skip
    picked = None if chosen is None else [chosen["tail_forks_in_flight"], chosen["tail_share"]]
    return {"k": k, "rule": TAIL_RULE, "none": none, "rows": rows, "chosen": picked}


def with_boost(shape: Shape, seeds: int, k: int, tail: tuple[int, float]) -> dict[str, Any]:
    """CARL at K with the chosen boost on another shape."""
    d = _runs(shape, SERVERS[shape.server], "carl", k, seeds, tail=tail)
    return {"k": k, "tail": list(tail), "carl_s": d["rollout_s"]["mean"], "detail": d}


#: The pools priced at the 7B shape (`pool_study`): CARL's floor at the second protocol's 3 and at N / 2, GRPO's at the
#: protocol's 4 (its average group the script's 16); the priors are the protocol's (docs/carl_vs_grpo_2.md).
POOL_GRID = {"carl": [(3, 4.0), (8, 4.0)], "grpo": [(4, 1.0)]}


def pool_study(shape: Shape, seeds: int, k: int) -> dict[str, Any]:
    """The step-level fork pool's rollout time (issue 32 item 3): CARL at K and GRPO, each without and with the pools
    of `POOL_GRID`. The simulated rewards are coin flips, so which trees get the extra forks is arbitrary here; what
    the model prices is the barrier (every tree of a worker waits for the worker's slowest first phase) and the
    uneven second phase."""
    server = SERVERS[shape.server]
    rows: dict[str, Any] = {"k": k, "carl": {}, "grpo": {}}
    for algo, grid in POOL_GRID.items():
        kk = k if algo == "carl" else 1
        rows[algo]["none"] = _runs(shape, server, algo, kk, seeds)["rollout_s"]
        for floor, prior in grid:
            settings = PoolSettings(floor=floor, prior=prior, group=shape.grpo_group if algo == "grpo" else 0)
            d = _runs(shape, server, algo, kk, seeds, pool=settings)
            rows[algo][f"floor{floor}_prior{prior:g}"] = d["rollout_s"] | {"tail_share": d["tail_share"]["mean"]}
    base = rows["grpo"]["none"]["mean"]
    rows["over_grpo"] = {f"{algo}_{name}": v["mean"] / base for algo in POOL_GRID for name, v in rows[algo].items()}
    return rows


def with_leaves(shape: Shape, seeds: int) -> dict[str, Any]:
    """GRPO with as many trajectories per question as a CARL tree has leaves (N0 + N), the CPU protocol's matching."""
    grpo = _runs(shape, SERVERS[shape.server], "grpo", 1, seeds, group=shape.n0 + shape.n_forks)
    return {"group": shape.n0 + shape.n_forks, "grpo_s": grpo["rollout_s"]["mean"], "detail": grpo}


def latency_bound(shape: Shape, ks: Sequence[int]) -> dict[str, float]:
    """CARL over GRPO when the server's time does not depend on load (t1 = t2 = prefill = 0, no capacity limit): what
    Alg. 1's order alone costs, a fork starting only from states of rollouts that have ended."""
    free = ServerModel(t0=SERVERS[shape.server].t0, t1=0.0, kv_tokens=10**12, max_num_seqs=10**9)
    out = predict_shape(shape, 1, ks, free)
    return out["carl_over_grpo"]


def sensitivity(shape: Shape, ks: Sequence[int]) -> list[dict[str, Any]]:
    """CARL over GRPO at each K under other plausible step curves (t0 and t1 scaled) and another trajectory-length
    tail (a constant answer hazard with the same mean length at T_max 32): how much the ratios depend on them."""
    base = SERVERS[shape.server]
    flat = fit_constant_hazard(expected_length(shape.policy.hazard, 32), 32)
    rows = []
    for (f0, f1), hazard in itertools.product(
        itertools.product((0.7, 1.0, 1.5), (0.5, 1.0, 2.0)), (shape.policy.hazard, (flat, 0.0))
    ):
        server = dataclasses.replace(base, t0=base.t0 * f0, t1=base.t1 * f1)
        variant = dataclasses.replace(shape, policy=dataclasses.replace(shape.policy, hazard=hazard))
        out = predict_shape(variant, 1, ks, server)
        rows.append({"t0_ms": server.t0 * 1e3, "t1_ms": server.t1 * 1e3, "hazard": list(hazard),
                     "carl_over_grpo": out["carl_over_grpo"]})  # fmt: skip
    return rows


def fit_constant_hazard(mean: float, t_max: int) -> float:
    """The constant answer probability whose capped geometric length has `mean` actions."""
    lo, hi = 1e-4, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_length((mid, 0.0), t_max) > mean else (lo, mid)
    return (lo + hi) / 2


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rollout_time", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="fit the paper shapes' policy to Table 2")
    cal.add_argument("--questions", type=int, default=200)
    pre = sub.add_parser("predict", help="every shape x setting; writes the results JSON")
    pre.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    pre.add_argument("--seeds", type=int, default=3)
    pre.add_argument("--out", type=Path, default=RESULTS)
    pre.add_argument("--no-sensitivity", action="store_true", help="skip the sensitivity table and latency bound")
    poo = sub.add_parser("pool", help="the fork pool's rollout time at the 7B shape, added to the results JSON")
    poo.add_argument("--seeds", type=int, default=3)
    poo.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.command == "calibrate":
        out = calibrate(args.questions)
        print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
        return out
    if args.command == "pool":
        if not args.out.exists():
            p.error(f"--out {args.out}: no results yet; run `python -m benchmarks.rollout_time predict` first")
        results = json.loads(args.out.read_text())
        results["pool_7b"] = pool_study(SHAPES["7b"], args.seeds, results["shapes"]["7b"]["default_forks_in_flight"])
        print(json.dumps(results["pool_7b"]["over_grpo"], indent=1))
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        return results
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: need at least 1")
    results: dict[str, Any] = {"command": "python -m benchmarks.rollout_time " + " ".join(sys.argv[1:]), "shapes": {}}
    for name in args.shapes:
        print(f"{name}: ...", flush=True)
        shape = SHAPES[name]
        out = results["shapes"][name] = predict_shape(shape, args.seeds)
        out["grpo_matched_leaves"] = with_leaves(shape, args.seeds)
        out["cost"] = cost(shape, out)
        if not args.no_sensitivity:
            out["latency_bound"] = latency_bound(shape, KS)
        print(json.dumps({k: out[k] for k in ("grpo_s", "carl_over_grpo", "default_forks_in_flight")}), flush=True)
    if "7b" in args.shapes:
        default = results["shapes"]["7b"]["default_forks_in_flight"]
        k1_actions = results["shapes"]["7b"]["detail"]["carl"]["1"]["actions_per_question"]["mean"]
        study = results["tail_7b"] = tail_study(SHAPES["7b"], args.seeds, default, k1_actions)
        print(json.dumps({"tail_chosen": study["chosen"]}), flush=True)
        for name, out in results["shapes"].items():
            if study["chosen"] and study["chosen"][0] >= out["default_forks_in_flight"]:  # the boost raises K
                out["with_tail"] = with_boost(SHAPES[name], args.seeds, out["default_forks_in_flight"], study["chosen"])
                out["with_tail"]["carl_over_grpo"] = out["with_tail"]["carl_s"] / out["grpo_s"]
        if not args.no_sensitivity:
            results["sensitivity_7b"] = sensitivity(SHAPES["7b"], sorted({1, default}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
