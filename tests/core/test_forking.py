"""Progressive forking (Alg. 1): fork choice, waves, T_max, the planner protocol, and density vs random."""

import asyncio
import math
import random

import pytest
import torch

from carl_core import CARLConfig, ForkPlanner, RolloutTree, Step, compute_fork_points

from .conftest import build_tree
from .support import grow_tree_sync


def test_density_picks_largest_h_over_n_and_breaks_ties_by_id():
    cand = torch.tensor([True, True, True])
    # h/n = 2/2, 3/1, 1/1 -> state 1.
    assert compute_fork_points(torch.tensor([2.0, 3.0, 1.0]), torch.tensor([2, 1, 1]), cand, 1) == [1]
    # All equal -> the lowest id.
    assert compute_fork_points(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1, 1, 1]), cand, 1) == [0]
    # A non-candidate is never picked even with the best score.
    assert compute_fork_points(
        torch.tensor([1.0, 9.0, 1.0]), torch.tensor([1, 1, 2]), torch.tensor([True, False, True]), 1
    ) == [0]


def test_wave_uses_virtual_counts_to_spread():
    h, n, cand = torch.tensor([1.0, 1.2, 0.9]), torch.tensor([1, 1, 1]), torch.tensor([True] * 3)
    # Pick 1 (1.2); its virtual n becomes 2 (0.6) -> pick 0 (1.0) -> 0.5 -> pick 2 (0.9).
    assert compute_fork_points(h, n, cand, 3) == [1, 0, 2]
    # Without virtual counts the entropy rule piles onto the largest h.
    assert compute_fork_points(h, n, cand, 3, "entropy") == [1, 1, 1]
    r1 = compute_fork_points(h, n, cand, 5, "random", random.Random(4))
    assert r1 == compute_fork_points(h, n, cand, 5, "random", random.Random(4)) and set(r1) <= {0, 1, 2}


def scripted_policy(entropy_at_depth, done_at_depth, max_vocab=50):
    """Step function whose action at depth d has one token with log-prob -entropy_at_depth[d]."""

    counter = iter(range(10**9))

    def step(tree, node):
        d = tree.nodes[node].depth
        return Step(
            [10 + next(counter) % max_vocab],
            [-entropy_at_depth[d]],
            [5],
            done=d + 1 >= done_at_depth,
            finish_reason="answer",
        )

    return step


def test_planner_follows_alg1_on_a_scripted_policy():
    # Depth-0 actions have h = 0.1, depth-1 h = 2.0, depth-2 h = 0.5; trajectories have 3 actions.
    config = CARLConfig(n0=1, n_forks=3, max_actions=10)
    tree = grow_tree_sync(RolloutTree([1], 10), config, scripted_policy([0.1, 2.0, 0.5], 3), lambda t, n: 1.0)
    # After the first rollout 0 -> 1 -> 2 -> 3: h/n = 0.1, 2.0, 0.5 -> fork at state 1 (h 2.0, n 1).
    # Then state 1 has n = 2 (h/n = 1.0) and the fork's child state has h 0.5 -> state 1 again (1.0 > 0.5),
    # then n = 3 (0.67) -> still state 1.
    assert tree.fork_points == [1, 1, 1]
    assert len(tree.leaves()) == config.num_leaves == 4
    assert all(tree.nodes[leaf].depth == 3 for leaf in tree.leaves())


def test_t_max_ends_rollouts_cleanly():
    config = CARLConfig(n0=2, n_forks=5, max_actions=3)
    never_stops = scripted_policy([1.0] * 10, done_at_depth=99)
    tree = grow_tree_sync(RolloutTree([1], 3), config, never_stops, lambda t, n: 0.0)
    tree.validate()
    assert len(tree.leaves()) == 7
    for leaf in tree.leaves():
        assert tree.nodes[leaf].depth == 3 and tree.nodes[leaf].finish_reason == "max_actions"


def test_next_wave_refuses_to_run_before_the_previous_wave_finished():
    planner = ForkPlanner(CARLConfig(n0=2, n_forks=1))
    tree = RolloutTree([1], 4)
    assert planner.next_wave(tree) == [0, 0]
    tree.add_action(0, [5], [-1.0], done=True)
    with pytest.raises(RuntimeError, match="2 rollouts were started but 1 ended"):
        planner.next_wave(tree)


def test_empty_step_at_a_fresh_state_makes_a_leaf_and_at_a_fork_point_aborts():
    calls = []

    def step(tree, node):
        calls.append(node)
        if len(calls) == 1:
            return Step([7], [-1.0], done=True)  # first rollout: one answer action
        return Step([], [], finish_reason="context_overflow")  # the fork at the root cannot generate

    tree = grow_tree_sync(RolloutTree([1], 4), CARLConfig(n0=1, n_forks=1), step, lambda t, n: 1.0)
    assert tree.aborted == [{"start": 0, "node": 0, "reason": "context_overflow"}]
    assert len(tree.leaves()) == 1
    # A root that cannot take any action becomes the (only) leaf.
    lone = grow_tree_sync(
        RolloutTree([1], 4),
        CARLConfig(n0=1, n_forks=0),
        lambda t, n: Step([], [], finish_reason="context_overflow"),
        lambda t, n: 0.0,
    )
    assert lone.leaves() == [0] and lone.root.finish_reason == "context_overflow"


def test_wave_rollouts_run_concurrently():
    # With wave_size 4, the four rollouts of a wave are in flight together (asyncio.gather).
    from carl_core import grow_tree

    in_flight, peak = 0, 0

    class Env:
        async def step(self, tree, node):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0)
            in_flight -= 1
            return Step([3], [-1.0], done=tree.nodes[node].depth >= 1)

        async def score(self, tree, leaf):
            return 0.0

    config = CARLConfig(n0=4, n_forks=8, wave_size=4, max_actions=5)
    asyncio.run(grow_tree(RolloutTree([1], 5), ForkPlanner(config), Env()))
    assert peak == 4


def decisive_state_policy(rng):
    """A 4-action task whose only decisive state is at depth 2, where the policy is uniform over 20 actions.

    Elsewhere the policy is nearly deterministic (p = 0.99), so its sampled actions have low entropy.
    """

    def step(tree, node):
        d = tree.nodes[node].depth
        if d == 2:
            return Step([100 + rng.randrange(20)], [math.log(1 / 20)], [1])
        return Step([11], [math.log(0.99)], [1], done=d == 3)

    return step


def fork_share_at_decisive_states(selection, seed=0, trees=40):
    rng = random.Random(seed)
    config = CARLConfig(n0=1, n_forks=8, selection=selection, max_actions=6)
    hits = total = 0
    for _ in range(trees):
        tree = grow_tree_sync(
            RolloutTree([1], 6), config, decisive_state_policy(rng), lambda t, n: 0.0, rng=random.Random(rng.random())
        )
        hits += sum(tree.nodes[s].depth == 2 for s in tree.fork_points)
        total += len(tree.fork_points)
    return hits / total


def test_density_forks_land_on_decisive_states_far_more_often_than_random():
    density, rand = fork_share_at_decisive_states("density"), fork_share_at_decisive_states("random")
    # density: h = 3.0 at depth-2 states vs 0.01 elsewhere, so all 8 forks go there (3.0 / 9 > 0.01).
    assert density == 1.0
    # random: uniform over 4+ candidate states, of which only the depth-2 ones are decisive.
    assert rand < 0.4


def test_hand_built_tree_forks_where_h_over_n_is_largest():
    # States: 0 (children 1, 4: h = mean(0.5, 1.5) = 1.0, n = 2 -> 0.5), 1 (child 2: h = 2.0 -> 2.0),
    # 2 (child 3: h = 0.25). Leaves 3, 4. Density picks state 1.
    tree = build_tree([(0, [-0.5], None), (1, [-2.0], None), (2, [-0.25], 1.0), (0, [-1.5], 0.0)])
    planner = ForkPlanner(CARLConfig(n0=2, n_forks=1))
    planner.rollouts_started = 2  # the two root rollouts above are done
    assert planner.next_wave(tree) == [1]
