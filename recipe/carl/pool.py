"""A step-level fork pool (issue 32): the step's fork budget shared by the trees of one agent-loop worker.

Off by default (`algorithm.carl.fork_pool: null`: every tree gets the paper's N forks). With a pool, each tree grows
in two phases:

    phase 1   N0 root rollouts and `floor` forks (the forks-in-flight rule), then it reports to the worker's pool
    barrier   once every tree of the worker's batch has reported (or failed, or `wait_s` ran out)
    phase 2   the rest of the budget, trees x N - the forks phase 1 grew, is dealt one fork at a time to the tree
              whose next fork is worth most (`allocate`); each tree then grows its extra forks (`grow_tree`'s second
              phase, the same fork rule and K)

The rule, declared once (`compute_tree_value`): a tree's worth is the spread of its outcomes so far, the sample
variance of its leaves' rewards shrunk toward a prior variance with `prior` pseudo-samples, and its j-th extra fork is
worth what it takes off the variance of the tree's mean outcome, v / (n + j) - v / (n + j + 1) (n: its rollouts). A
tree whose outcomes disagree asks for more forks than one whose outcomes all agree (Knapsack RL's and CERO's
reallocation from saturated to informative prompts, with the tree's own outcomes as the signal, since a question is
seen once). GRPO with the pool (`group`): groups of `floor` trajectories (at least 2), then the rest of
questions x `group` trajectories dealt by the same rule, each extra trajectory a new chain of its question.

Repeatable: the allocation is a function of the reported trees alone, taken in the order of their keys (the dataset
row and session), never of which tree reported first. A tree that raises in phase 1 leaves the pool (its share goes to
the others); one that has not reported after `wait_s` is left out of the allocation and gets no extra fork. The agent
loop's rows and the trainer's metrics (`carl/pool_*`) follow.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from carl_core import (
    CARLConfig,
    CARLConfigError,
    Environment,
    ForkPlanner,
    RolloutTree,
    grow_tree,
    has_outcome,
    rollout_from,
)
from carl_core.forking import Tail


@dataclass(frozen=True)
class PoolSettings:
    """`algorithm.carl.fork_pool` (the pilot chose the values of the experiment: docs/carl_vs_grpo_2.md)."""

    floor: int = 2
    """CARL: forks every tree grows before the barrier (0 .. N). GRPO: trajectories every question gets (>= 2:
    verl's GRPO trains a lone trajectory on its raw reward)."""
    prior: float = 2.0
    """Pseudo-samples of the prior variance in a tree's value (the rule's one constant)."""
    group: int = 0
    """GRPO only: trajectories per question on average, so the step's budget is questions x `group` (0 under CARL,
    whose budget is trees x N)."""
    wait_s: float = 1800.0
    """How long the barrier waits for the last trees after the first one reported (a stuck tree must not hang the
    step); the trees not reported by then get no extra fork."""

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise CARLConfigError(f"algorithm.carl.fork_pool.{msg}")

        if not isinstance(self.floor, int) or isinstance(self.floor, bool) or self.floor < 0:
            fail(f"floor={self.floor!r} must be an integer >= 0 (forks each tree gets before the barrier).")
        if not isinstance(self.prior, (int, float)) or not self.prior > 0:
            fail(f"prior={self.prior!r} must be a number > 0 (pseudo-samples of the prior variance).")
        if not isinstance(self.group, int) or isinstance(self.group, bool) or self.group < 0:
            fail(f"group={self.group!r} must be an integer >= 0 (GRPO's trajectories per question; 0 under CARL).")
        if not self.wait_s > 0:
            fail(f"wait_s={self.wait_s!r} must be > 0 seconds.")

    @classmethod
    def from_value(cls, value: Any) -> PoolSettings | None:
        """None (no pool) for null or false; the settings from a mapping, unknown keys refused by name."""
        if value is None or value is False:
            return None
        if not isinstance(value, Mapping):
            raise CARLConfigError(
                f"algorithm.carl.fork_pool={value!r} must be null (no pool) or a mapping such as "
                "{floor: 2, prior: 2.0} (docs/config.md)."
            )
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(value) - known):
            raise CARLConfigError(f"algorithm.carl.fork_pool has unknown key(s) {unknown}: use {sorted(known)}.")
        return cls(**dict(value))

    def check(self, n_forks: int, grpo: bool) -> None:
        """What the pool needs from the run: CARL's floor <= N; GRPO's floor >= 2 and a group >= floor."""
        if grpo:
            if self.floor < 2 or self.group < self.floor:
                raise CARLConfigError(
                    f"algorithm.carl.fork_pool: GRPO needs floor >= 2 (a lone trajectory is trained on its raw reward) "
                    f"and group >= floor (got floor={self.floor}, group={self.group}); e.g. {{floor: 2, group: 8}} "
                    "with actor_rollout_ref.rollout.n=1."
                )
        elif self.floor > n_forks or self.group:
            raise CARLConfigError(
                f"algorithm.carl.fork_pool: under CARL floor <= n_forks ({self.floor} > {n_forks}?) and no group "
                f"(got group={self.group}): the budget is trees x n_forks."
            )


def compute_tree_value(rewards: Sequence[float], counts: Sequence[int], prior: float, prior_var: float) -> float:
    """v(t): the variance of a tree's outcomes, shrunk toward a prior variance.

    Math (r_i the reward of leaf i, reached m_i times, n = sum m_i, r_bar the mean; alpha = `prior`):
        v = (sum_i m_i (r_i - r_bar)^2 + alpha * prior_var) / (n + alpha)

    Args:
        rewards: the tree's leaf rewards with an outcome [len: leaves].
        counts: how many rollouts reached each [len: leaves].
        prior: alpha > 0.
        prior_var: the prior variance (`allocate` uses (range / 2)^2 of the worker's rewards).
    """
    n = sum(counts)
    mean = sum(m * r for m, r in zip(counts, rewards, strict=True)) / n if n else 0.0
    spread = sum(m * (r - mean) ** 2 for m, r in zip(counts, rewards, strict=True))
    return (spread + prior * prior_var) / (n + prior)


def allocate(values: Sequence[float], samples: Sequence[int], budget: int) -> list[int]:
    """Deals `budget` extra forks (GRPO: trajectories) one at a time to the tree whose next one is worth most.

    Math (tree t of value v_t with n_t samples and j_t extras so far; ties to the lowest index):
        worth of its next extra = v_t / (n_t + j_t) - v_t / (n_t + j_t + 1)

    Args:
        values: v of each tree (`compute_tree_value`) [len: trees].
        samples: n of each tree (its rollouts, >= 1) [len: trees].
        budget: extras to deal (>= 0).

    Returns:
        The extras of each tree [len: trees], summing to `budget` (0 each when there is no tree).
    """
    extra = [0] * len(values)
    if not values:
        return extra
    for _ in range(budget):
        worth = [v / (n + j) - v / (n + j + 1) for v, n, j in zip(values, samples, extra, strict=True)]
        extra[max(range(len(worth)), key=lambda t: (worth[t], -t))] += 1
    return extra


def tree_outcomes(tree: RolloutTree) -> tuple[list[float], list[int]]:
    """The rewards of a finished tree's leaves with an outcome, and how many rollouts reached each."""
    leaves = [n for n in tree.nodes if n.terminal and has_outcome(n.finish_reason) and n.reward is not None]
    return [float(n.reward) for n in leaves], [n.count - n.lost for n in leaves]  # type: ignore[arg-type]


@dataclass
class _Member:
    rewards: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    used: int = 0
    reported: bool = False
    left: bool = False


class ForkPool:
    """One training step's pool in one agent-loop worker: trees join, report after phase 1, and get their extras.

    Every tree must `join` before any tree reports: the agent loop joins at the start of `run()`, before its first
    `await`, and verl's worker starts all of its samples' `run()` before any of them resumes (`AgentLoopWorker.
    generate_sequences` creates their tasks in one loop).
    """

    def __init__(self, settings: PoolSettings, share: int) -> None:
        self.settings, self.share = settings, share
        self.members: dict[Any, _Member] = {}
        self.closed = False
        self.result: dict[Any, int] | None = None
        self.changed = asyncio.Event()

    def join(self, key: Any) -> None:
        if self.closed:
            raise RuntimeError(
                f"tree {key!r} joined the fork pool after its allocation: the pool needs every tree of the worker's "
                "batch to start together (verl's AgentLoopWorker starts them in one loop)."
            )
        if key in self.members:
            raise RuntimeError(f"tree {key!r} joined the fork pool twice: every tree needs a key of its own.")
        self.members[key] = _Member()

    def leave(self, key: Any) -> None:
        """A tree that failed before reporting: its share goes to the others."""
        self.members[key].left = True
        self.changed.set()

    async def report(self, key: Any, rewards: Sequence[float], counts: Sequence[int], used: int) -> int:
        """Phase 1 is over for `key` (`used` forks or trajectories grown); waits for the barrier, returns its extras."""
        member = self.members[key]
        member.rewards, member.counts, member.used, member.reported = list(rewards), list(counts), used, True
        self.changed.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.wait_s
        while self.result is None:
            if all(m.reported or m.left for m in self.members.values()) or loop.time() >= deadline:
                self.result = self._allocate()
                self.changed.set()
                break
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                pass
        return self.result.get(key, 0)

    def _allocate(self) -> dict[Any, int]:
        self.closed = True
        ready = sorted((k for k, m in self.members.items() if m.reported and not m.left), key=repr)
        if not ready:
            return {}
        budget = len(self.members) * self.share - sum(self.members[k].used for k in ready)
        rewards = [r for k in ready for r in self.members[k].rewards]
        prior_var = ((max(rewards) - min(rewards)) / 2) ** 2 if rewards else 0.0
        values = [compute_tree_value(self.members[k].rewards, self.members[k].counts, self.settings.prior, prior_var)
                  for k in ready]  # fmt: skip
        samples = [max(1, sum(self.members[k].counts)) for k in ready]
        return dict(zip(ready, allocate(values, samples, max(0, budget)), strict=True))

    def stats(self) -> dict[str, Any]:
        """What the allocation gave: per tree its total (phase 1 + extra), and the trees left out."""
        result = self.result or {}
        totals = [m.used + result.get(k, 0) for k, m in self.members.items() if m.reported and not m.left]
        return {"totals": totals, "left_out": sum(1 for m in self.members.values() if m.left or not m.reported)}


async def grow_pooled(
    tree: RolloutTree,
    env: Environment,
    pool: ForkPool,
    key: Any,
    config: CARLConfig,
    rng: random.Random,
    grpo: bool,
    tail: Tail | None = None,
) -> dict[str, int]:
    """Phase 1, the barrier and phase 2 of one tree (`grpo`: one question's group of chains) in the pool; returns
    `{"total", "floor", "left_out"}` (forks or trajectories). Leaves the pool if phase 1 raises. `tail`: the
    straggler boost of a CARL tree (`grow_tree`)."""
    floor = pool.settings.floor
    planner = ForkPlanner(config, rng)
    try:
        if grpo:  # `floor` trajectories, each a chain from the root
            await grow_tree(tree, ForkPlanner(dataclasses.replace(config, n0=floor, n_forks=0)), env)
            used = floor
        else:  # N0 root rollouts and `floor` forks
            await grow_tree(tree, planner, env, forks=floor, tail=tail)
            used = len(tree.fork_points)
    except BaseException:
        pool.leave(key)
        raise
    extra = await pool.report(key, *tree_outcomes(tree), used)
    if extra and grpo:
        await asyncio.gather(*(rollout_from(tree, tree.start_rollout(tree.root.id), env) for _ in range(extra)))
        tree.canonicalize()
    elif extra:
        await grow_tree(tree, planner, env, forks=extra, tail=tail)
    return {"total": used + extra, "floor": floor, "left_out": pool.stats()["left_out"]}


class PoolRegistry:
    """The worker process's pools, one per training step (the agent loop's `POOLS`)."""

    def __init__(self) -> None:
        self.pools: dict[int, ForkPool] = {}

    def get(self, step: int, settings: PoolSettings, share: int) -> ForkPool:
        if step not in self.pools:
            self.pools[step] = ForkPool(settings, share)
        for old in [s for s in self.pools if s < step - 2]:
            del self.pools[old]
        return self.pools[step]


POOLS = PoolRegistry()


def pool_metrics(snapshots: Sequence[Mapping[str, Any] | None]) -> dict[str, float]:
    """`carl/pool_*` from the step's trees' records (`{"total", "floor", "left_out"}` per tree): forks (GRPO:
    trajectories) per tree, min / median / max, and the trees that got no more than the floor."""
    recs = [s for s in snapshots if s]
    if not recs:
        return {}
    totals = sorted(r["total"] for r in recs)
    mid = len(totals) // 2
    median = totals[mid] if len(totals) % 2 else (totals[mid - 1] + totals[mid]) / 2
    return {
        "carl/pool_per_tree_min": float(totals[0]),
        "carl/pool_per_tree_median": float(median),
        "carl/pool_per_tree_max": float(totals[-1]),
        "carl/pool_at_floor_fraction": sum(r["total"] <= r["floor"] for r in recs) / len(recs),
        "carl/pool_total": float(sum(totals)),
        "carl/pool_left_out": float(max(r.get("left_out", 0) for r in recs)),
    }
