"""Helpers shared by the carl_core tests: hand-built trees and a random tree generator."""

from __future__ import annotations

import math
import random

import pytest

from carl_core import CARLConfig, RolloutTree, Step

from .support import grow_tree_sync


def build_tree(
    edges: list[tuple[int, list[float], float | None]], max_actions: int = 32, uid: str = "t"
) -> RolloutTree:
    """Builds a tree from (parent, log_probs, reward) per new node, in id order (node ids start at 1).

    A node gets an action of len(log_probs) tokens with ids 100*id + j and a 2-token observation 900+id, 950+id.
    Nodes with a reward are terminal.
    """
    tree = RolloutTree([1, 2, 3], max_actions=max_actions, uid=uid)
    for i, (parent, lps, reward) in enumerate(edges, start=1):
        toks = [100 * i + j for j in range(len(lps))]
        nid = tree.add_action(parent, toks, lps, [900 + i, 950 + i], done=reward is not None, finish_reason="answer")
        assert nid == i
        if reward is not None:
            tree.set_reward(nid, reward)
    return tree


def random_tree(rng: random.Random, config: CARLConfig, p_stop: float = 0.3, uid: str = "r") -> RolloutTree:
    """A CARL tree grown by the real planner under a random policy with random rewards."""

    def step(tree: RolloutTree, node: int) -> Step:
        n = rng.randint(1, 4)
        done = rng.random() < p_stop
        return Step(
            token_ids=[rng.randint(10, 99) for _ in range(n)],
            log_probs=[math.log(rng.uniform(0.05, 1.0)) for _ in range(n)],
            observation_ids=[rng.randint(10, 99) for _ in range(rng.randint(0, 3))],
            done=done,
            finish_reason="answer" if done else None,
        )

    def score(tree: RolloutTree, leaf: int) -> float:
        return rng.choice([0.0, 0.0, 0.5, 1.0, rng.random()])

    tree = RolloutTree([1, 2], config.max_actions, uid=uid)
    return grow_tree_sync(tree, config, step, score, rng=random.Random(rng.random()))


@pytest.fixture
def fig_tree() -> RolloutTree:
    """The 7-node tree used across the tests (N0 = 1, two forks, max_actions large).

    0 ─a1─> 1 ─a2─> 2 ─a3─> 3 (R=1)        initial rollout
            1 ─a4─> 4 ─a5─> 5 (R=0)        fork at state 1
    0 ─a6─> 6 (R=1)                        fork at the root
    """
    lp = [-0.5, -1.0]
    return build_tree([(0, lp, None), (1, lp, None), (2, lp, 1.0), (1, lp, None), (4, lp, 0.0), (0, lp, 1.0)])
