"""Progressive forking (Alg. 1) as a planner that decides where rollouts start, and the driver that grows a tree.

    wave 0:  N0 rollouts from the root                  next_wave -> [0, 0, ..., 0]      (N0 times)
    wave i:  k fork points chosen by the rule           next_wave -> [s_1, ..., s_k]     (k = wave_size)
             each rollout samples a new action at s_j and continues to a terminal state
    done:    N forks handed out                         next_wave -> []

Rules (`CARLConfig.selection`): `density` (the paper: the largest h_hat / n_hat, i.e. the lowest action density d(s) =
n(s) / H(s) of Eq. 12, ties to the lowest node id); `spread` (the same with C_hat of `compute_outcome_criticality`,
built on the outcomes seen so far: between waves every leaf is finished); `random` (ablation #2, the planner's seeded
rng); `entropy` (the largest h_hat). n_hat counts samples, a merged action each time. With k > 1 the picks of a wave are
made against *virtual* counts (each pick adds 1 to its state's n_hat for the rest of the wave) so a wave spreads over
the k best states; k = 1 is Alg. 1 exactly. The N0 root rollouts are always one wave.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from carl_core.config import CARLConfig
from carl_core.entropy import compute_state_entropy
from carl_core.tree import RolloutTree, pack_trees
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
    if selection == "entropy":
        # torch.argmax returns the first maximum, i.e. the lowest node id: a deterministic tie-break.
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
    """Hands out the start states of a tree's rollouts, wave by wave (Alg. 1)."""

    def __init__(self, config: CARLConfig, rng: random.Random | None = None) -> None:
        self.config, self.rng = config, rng or random.Random(config.seed)
        self.rollouts_started = self.forks_started = 0

    def next_wave(self, tree: RolloutTree) -> list[int]:
        """Start states of the next wave of rollouts; empty when the tree is complete.

        Call it again only after every rollout of the previous wave has reached a terminal state.
        """
        finished = tree.rollouts_ended()
        if finished != self.rollouts_started:
            raise RuntimeError(
                f"tree {tree.uid!r}: {self.rollouts_started} rollouts were started but {finished} ended; "
                "finish every rollout of a wave (to a leaf, or record it in tree.aborted) before the next wave."
            )
        if self.rollouts_started == 0:
            wave = [tree.root.id] * self.config.n0
        else:
            k = min(self.config.wave_size, self.config.n_forks - self.forks_started)
            forkable = self.forkable(tree)
            if k <= 0 or not forkable.any():
                return []
            a = pack_trees([tree])
            h_hat, n_hat = compute_state_entropy(a.parent, a.action_entropy, a.count)
            if self.config.selection == "spread":
                v = compute_node_values(
                    a.parent, a.reward, a.is_leaf, a.depth, count=a.count, has_outcome=a.has_outcome
                )
                h_hat = compute_outcome_criticality(a.parent, v, a.count, h_hat, forkable, self.config.spread_prior)
            wave = compute_fork_points(h_hat, n_hat, forkable, k, self.config.selection, self.rng)
            self.forks_started += k
            tree.fork_points.extend(wave)
        self.rollouts_started += len(wave)
        return wave

    @staticmethod
    def forkable(tree: RolloutTree) -> torch.Tensor:
        """States where a new action may be sampled: expanded, not terminal, below T_max [shape: (num_nodes,)]."""
        return torch.tensor(
            [bool(n.children) and not n.terminal and n.depth < tree.max_actions for n in tree.nodes], dtype=torch.bool
        )


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


class Environment(Protocol):
    """What `grow_tree` needs: sample-and-execute one action, and score a finished trajectory."""

    def step(self, tree: RolloutTree, node_id: int) -> Awaitable[Step]: ...

    def score(self, tree: RolloutTree, leaf_id: int) -> Awaitable[float]: ...


async def rollout_from(tree: RolloutTree, start: int, env: Environment) -> int | None:
    """RolloutFrom(s) of Alg. 1: samples actions from `start` until a terminal state; returns the leaf id.

    Returns None (and records the reason in `tree.aborted`) when the environment could take no action at an
    already-expanded start state, which can then not become a leaf.
    """
    node = start
    while True:
        step = await env.step(tree, node)
        if len(step.token_ids) == 0:
            reason = step.finish_reason or "no_action"
            if tree.nodes[node].children or tree.nodes[node].terminal:  # a sibling rollout got here first
                tree.aborted.append({"start": start, "node": node, "reason": reason})
                return None
            tree.terminate(node, reason)
        else:
            node = tree.add_action(
                node,
                step.token_ids,
                step.log_probs,
                step.observation_ids,
                done=step.done,
                finish_reason=step.finish_reason,
                info=step.info,
            )
        if tree.nodes[node].terminal:
            if tree.nodes[node].reward is None:  # a rollout that merged into a finished leaf has its outcome already
                tree.set_reward(node, float(await env.score(tree, node)))
            return node


async def grow_tree(tree: RolloutTree, planner: ForkPlanner, env: Environment) -> RolloutTree:
    """Grows a full CARL tree: N0 rollouts from the root, then N forks in waves (Alg. 1).

    The rollouts of one wave run concurrently (`asyncio.gather`); waves run one after another because each wave's
    fork points depend on the entropies the previous waves measured.
    """
    while wave := planner.next_wave(tree):
        await asyncio.gather(*(rollout_from(tree, start, env) for start in wave))
    return tree
