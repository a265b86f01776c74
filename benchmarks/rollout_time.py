"""The rollout-time model (issue 29): the real scheduler, a simulated inference server, GRPO against CARL.

    python -m benchmarks.rollout_time calibrate            # the paper shapes' policy from Table 2 (prints the fit)
    python -m benchmarks.rollout_time predict              # every shape x setting -> benchmarks/results/rollout_time.json
    python -m benchmarks.rollout_time predict --shapes 7b --trees 32      # quicker, smaller

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
    hazard: tuple[float, float] = (0.12, 0.02)
    """(a, b): P(the action at depth d answers) = 1 - (1 - a) * exp(-b * d)."""
    entropy: tuple[float, float, float] = (0.5, 0.6, 0.0)
    """(median, sigma, trend): h ~ log-normal(median * exp(trend * d), sigma)."""
    search_s: float = 0.05
    """Mean latency of one search (exponential)."""

    def draw(self, question: int, draw: Draw, depth: int) -> tuple[bool, int, float, int]:
        """(answers, action tokens, entropy, observation tokens) of one action."""
        r = _rng(question, draw.rollout, draw.turn)
        a, b = self.hazard
        answers = r.random() < 1 - (1 - a) * math.exp(-b * depth)
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
