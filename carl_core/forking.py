"""Progressive forking (Alg. 1) as a planner that decides where rollouts start, and the driver that grows a tree.

    rollouts:  numbered in start order: first N0 from the root, concurrently, then N forks
    fork i:    chosen once rollouts 0 .. i - K have ended (K = `forks_in_flight`), from what they grew, rollouts
               i - K + 1 .. i - 1 (running) counted at their start states; it samples a new action there and continues
               to a terminal state. At most K forks run at once, and with K > 1 forks may start before the last root
               rollouts end.

Fork i's choice never depends on which rollout happened to finish first: it sees exactly rollouts 0 .. i - K,
through `RolloutTree.view` (node ids and ties in canonical order). K = 1 is Alg. 1 exactly.

Rules (`CARLConfig.selection`): `density` (the paper: the largest h_hat / n_hat, i.e. the lowest action density d(s) =
n(s) / H(s) of Eq. 12, ties to the lowest node id); `spread` (the same with C_hat of `compute_outcome_criticality`,
built on the outcomes the choice sees); `random` (ablation #2, the planner's seeded rng); `entropy` (the largest
h_hat). n_hat counts samples, a merged action each time, plus a virtual one per running fork at its start state.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch

from carl_core.config import CARLConfig
from carl_core.entropy import compute_state_entropy
from carl_core.tree import CLOSED_FINISH, RolloutTree, pack_trees
from carl_core.values import compute_node_values


def compute_outcome_criticality(
    parent: torch.Tensor,
    node_value: torch.Tensor,
    count: torch.Tensor,
    state_entropy: torch.Tensor,
    candidate: torch.Tensor,
    prior_weight: float = 8.0,
) -> torch.Tensor:
    """C_hat(s) of `selection=spread`: Eq. 12's entropy prior, moved toward the observed spread of outcomes.

    Math (Eq. 5: criticality C(s) = std_{a ~ pi(.|s)} R(tau_{s,a}); the values V(c) of the children, sampled m_c times,
    are its sample once they number two; R_max, R_min over the tree's valued leaves):
        sigma_hat(s) = sqrt( sum_c m_c (V(c) - V(s))^2 / n_v(s) ),   n_v(s) = sum_{c valued} m_c
        h~(s) = h_hat(s) / max_{s' candidate} h_hat(s'),   sigma~(s) = sigma_hat(s) / ((R_max - R_min) / 2)
        C_hat(s) = h~(s) if n_v(s) < 2, else (lambda * h~(s) + n_v(s) * sigma~(s)) / (lambda + n_v(s))     (Eq. 12')
        s* = argmax C_hat(s) / n_hat(s)        (`compute_fork_points`, as Eq. 12 with h_hat)

    One scale: each term divided by its largest possible value in the tree so far. lambda weighs the prior in samples:
    a state forked once whose two outcomes agree keeps lambda / (lambda + 2) of it (the exploration term).

    Args:
        parent, node_value, count, state_entropy, candidate: per node [shape: (num_nodes,)]: the parent (-1 at the
            root), V (NaN without value), m, h_hat, and whether the state may be forked.
        prior_weight: lambda > 0.

    Returns:
        C_hat on candidates, 0 elsewhere [shape: (num_nodes,)], float64.
    """
    # Step 1: the children's weighted squared deviations from their parent's value, and their weight n_v.
    v = node_value.to(torch.float64)
    kid = (parent >= 0) & ~torch.isnan(v)
    m = count[kid].to(torch.float64)
    n_v = torch.zeros_like(v).index_add_(0, parent[kid], m)
    sq = torch.zeros_like(v).index_add_(0, parent[kid], m * (v[kid] - v[parent[kid]]) ** 2)
    sigma = torch.sqrt(sq / n_v.clamp(min=1))
    # Step 2: both terms on [0, 1].
    leaves = ~torch.isnan(v) & (torch.bincount(parent[parent >= 0], minlength=v.numel()) == 0)
    half_range = (v[leaves].max() - v[leaves].min()) / 2 if bool(leaves.any()) else torch.tensor(0.0)
    sigma_t = sigma / half_range if half_range > 0 else torch.zeros_like(sigma)
    h = torch.where(candidate, state_entropy.to(torch.float64), 0.0)
    h_t = h / h.max() if bool(h.max() > 0) else torch.ones_like(h)
    # Step 3: the prior alone below two valued samples, else shrunk toward the observed spread.
    shrunk = (prior_weight * h_t + n_v * sigma_t) / (prior_weight + n_v)
    return torch.where(candidate, torch.where(n_v >= 2, shrunk, h_t), 0.0)


def compute_fork_points(
    state_entropy: torch.Tensor,
    num_children: torch.Tensor,
    candidate: torch.Tensor,
    k: int,
    selection: str = "density",
    rng: random.Random | None = None,
) -> list[int]:
    """Chooses k fork points among the candidate states (Alg. 1, line 6).

    Math (Alg. 1 / Eq. 12):
        density:  s* = argmax_s h_hat(s) / (n_hat(s) + v(s)),  v(s*) += 1 after each pick of the wave
        spread:   the same with C_hat(s) (`compute_outcome_criticality`) passed as `state_entropy`
        entropy:  s* = argmax_s h_hat(s)
        random:   s* ~ Uniform(candidates)

    Args:
        state_entropy: h_hat per node (C_hat for "spread") [shape: (num_nodes,)].
        num_children: n_hat per node [shape: (num_nodes,)].
        candidate: True on states that may be forked [shape: (num_nodes,)].
        k: number of fork points to return.
        selection: "density" | "spread" | "random" | "entropy".
        rng: random generator for "random".

    Returns:
        k node ids (repeats allowed), in pick order.
    """
    ids = torch.nonzero(candidate).flatten().tolist()
    if not ids:
        raise ValueError("no state can be forked: every trajectory ended at the root or at T_max.")
    if selection == "random":
        rng = rng or random.Random(0)
        return [rng.choice(ids) for _ in range(k)]
    h = state_entropy[ids].to(torch.float64)
    if selection == "entropy":  # torch.argmax returns the first maximum, the lowest node id: a deterministic tie-break
        return [ids[int(torch.argmax(h))]] * k
    if selection not in ("density", "spread"):
        raise ValueError(f"selection={selection!r} is unknown: use density, spread, random or entropy.")
    n = num_children[ids].to(torch.float64).clone()
    picks = []
    for _ in range(k):
        j = int(torch.argmax(h / n))
        picks.append(ids[j])
        n[j] += 1  # virtual count: the next pick of this wave sees the state as already forked
    return picks


class ForkPlanner:
    """Chooses the start state of each fork (Alg. 1, line 6) from the rollouts that the choice may see."""

    def __init__(self, config: CARLConfig, rng: random.Random | None = None) -> None:
        self.config, self.rng = config, rng or random.Random(config.seed)

    def choose(self, tree: RolloutTree, seen: set[int], running: Sequence[int] = ()) -> int | None:
        """The next fork point: a node id of `tree`, or None when no state of the seen tree can be forked.

        Args:
            tree: the tree being grown.
            seen: the rollouts (numbers) whose result the choice uses; every one of them has ended.
            running: start states of forks still running (each adds a virtual count at its state).
        """
        view, shows = tree.view(seen)
        forkable = self.forkable(view)
        if not forkable.any():
            return None
        a = pack_trees([view])
        h_hat, n_hat = compute_state_entropy(a.parent, a.action_entropy, a.count)
        index = {node: i for i, node in enumerate(shows)}
        for start in running:  # a running fork whose start state this view lacks counts at its nearest shown ancestor
            while start not in index:
                start = tree.nodes[start].parent or 0
            n_hat[index[start]] += 1
        if self.config.selection == "spread":
            v = compute_node_values(a.parent, a.reward, a.is_leaf, a.depth, count=a.weight, has_outcome=a.has_outcome)
            h_hat = compute_outcome_criticality(a.parent, v, a.weight, h_hat, forkable, self.config.spread_prior)
        (pick,) = compute_fork_points(h_hat, n_hat, forkable, 1, self.config.selection, self.rng)
        return shows[pick]

    @staticmethod
    def forkable(tree: RolloutTree) -> torch.Tensor:
        """States where a new action may be sampled: expanded, not terminal, below T_max, not closed by a context
        overflow [shape: (num_nodes,)]."""
        closed = {n.parent for n in tree.nodes if n.is_stop and (n.finish_reason or "") in CLOSED_FINISH}
        free = [bool(n.children) and not n.terminal and n.id not in closed for n in tree.nodes]
        return torch.tensor(free, dtype=torch.bool) & torch.tensor([n.depth < tree.max_actions for n in tree.nodes])


@dataclass
class Step:
    """What the environment returns for one action sampled at a state."""

    token_ids: Sequence[int]
    """The sampled action; empty means no action could be taken here (the state itself ends the trajectory)."""
    log_probs: Sequence[float]
    observation_ids: Sequence[int] = ()
    """Tool output and template glue appended after the action (part of the next state, never trained)."""
    done: bool = False
    finish_reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Draw(NamedTuple):
    """Which sample an environment step is: the rollout's number (start order) and the turn within that rollout.
    Unlike node ids and visit counts, it does not depend on the order in which concurrent rollouts ran, so sampling
    seeds derived from it make runs repeatable."""

    rollout: int
    turn: int


class Tail(NamedTuple):
    """A straggler's boost (`grow_tree`): once `event` is set, up to `forks_in_flight` forks of the tree at once."""

    event: asyncio.Event
    forks_in_flight: int


class Environment(Protocol):
    """What `grow_tree` needs: sample-and-execute one action, and score a finished trajectory."""

    def step(self, tree: RolloutTree, node_id: int, draw: Draw) -> Awaitable[Step]: ...

    def score(self, tree: RolloutTree, leaf_id: int) -> Awaitable[float]: ...


async def rollout_from(tree: RolloutTree, rollout: int, env: Environment) -> int:
    """RolloutFrom(s) of Alg. 1 for a rollout registered with `tree.start_rollout(s)`: samples actions until a
    terminal state and returns the leaf. A step without an action ends the rollout in a stop (`RolloutTree.stop`)."""
    node, turn = tree.rollout_start[rollout], 0
    while True:
        step = await env.step(tree, node, Draw(rollout, turn))
        turn += 1
        if len(step.token_ids) == 0:
            node = tree.stop(node, step.finish_reason or "no_action", rollout)
        else:
            node = tree.add_action(
                node,
                step.token_ids,
                step.log_probs,
                step.observation_ids,
                done=step.done,
                finish_reason=step.finish_reason,
                info=step.info,
                rollout=rollout,
            )
        if tree.nodes[node].terminal:
            if tree.nodes[node].reward is None:  # a rollout that merged into a finished leaf has its outcome already
                tree.set_reward(node, float(await env.score(tree, node)))
            tree.end_rollout(rollout, node)
            return node


async def grow_tree(
    tree: RolloutTree, planner: ForkPlanner, env: Environment, forks: int | None = None, tail: Tail | None = None
) -> RolloutTree:
    """Grows a CARL tree (Alg. 1): N0 root rollouts, then `forks` (default N) forks, each chosen as the module says,
    and numbers its nodes canonically. A tree with rollouts already (a fork pool's second phase) gets only its forks,
    each choice seeing at least its earlier rollouts. Once `tail.event` is set, K becomes `tail.forks_in_flight` (a
    straggler's boost; the choices then depend on when it was set)."""
    k, done = planner.config.forks_in_flight, len(tree.rollout_start)
    roots = [] if done else [tree.start_rollout(tree.root.id) for _ in range(planner.config.n0)]
    futures = [asyncio.ensure_future(rollout_from(tree, r, env)) for r in roots]  # futures[j] is rollout done + j
    woken = [asyncio.ensure_future(tail.event.wait())] if tail else []
    first = len(tree.rollout_start)
    try:
        for i in range(first, first + (planner.config.n_forks if forks is None else forks)):
            extra = 0  # rollouts waited for beyond i - K because nothing they showed could be forked
            while True:
                k = max(k, tail.forks_in_flight) if tail and tail.event.is_set() else k
                last = min(max(i - k, done - 1, 0) + extra, i - 1)
                needed = futures[: last + 1 - done]
                if not woken or woken[0].done() or all(f.done() for f in needed):
                    await asyncio.gather(*needed)
                else:  # wake at the next end (of one still running: an ended one would wake at once), or the boost
                    await asyncio.wait([*(f for f in needed if not f.done()), woken[0]], return_when="FIRST_COMPLETED")
                    continue
                running = [tree.rollout_start[r] for r in range(last + 1, i)]
                start = planner.choose(tree, set(range(last + 1)), running)
                if start is not None or last == i - 1:
                    break
                extra += 1  # nothing to fork in what this choice sees: wait for the next rollout
            if start is None:
                break
            tree.fork_points.append(start)
            futures.append(asyncio.ensure_future(rollout_from(tree, tree.start_rollout(start), env)))
        await asyncio.gather(*futures)
    finally:
        for future in futures + woken:
            future.cancel()
    tree.canonicalize()
    return tree
