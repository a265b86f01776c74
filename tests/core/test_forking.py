"""Progressive forking (Alg. 1): fork choice, forks in flight, T_max, the planner, stops, and density vs random."""

import asyncio
import math
import random

import pytest
import torch

from carl_core import CARLConfig, ForkPlanner, RolloutTree, Step, compute_fork_points, compute_outcome_criticality

from .conftest import build_tree
from .support import ended, grow_tree_sync


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


def test_a_choice_sees_only_the_rollouts_it_is_given():
    # Two ended rollouts from the root: r0 = 0 -> 1 (h 0.5) -> 2 (h 2.0, leaf), r1 = 0 -> 3 (h 1.0, leaf).
    tree = RolloutTree([1], 4)
    r0, r1 = tree.start_rollout(0), tree.start_rollout(0)
    s1 = tree.add_action(0, [5], [-0.5], [9], rollout=r0)
    for rollout, leaf in ((r0, tree.add_action(s1, [6], [-2.0], done=True, rollout=r0)),
                          (r1, tree.add_action(0, [7], [-1.0], done=True, rollout=r1))):  # fmt: skip
        tree.set_reward(leaf, 1.0)
        tree.end_rollout(rollout, leaf)
    planner = ForkPlanner(CARLConfig(n0=2, n_forks=1))
    # Seeing both: root h/n = 0.75 / 2, state 1: 2.0 / 1 -> state 1.
    assert planner.choose(tree, {r0, r1}) == s1
    # Seeing r1 alone, state 1 is not in the tree: the root is the only state to fork.
    assert planner.choose(tree, {r1}) == 0
    # A fork running at state 1 counts there: 2.0 / 2 = 1.0 > 0.375, still state 1; two running: 0.67 > 0.375.
    assert planner.choose(tree, {r0, r1}, [s1, s1]) == s1
    # Five running there: 2.0 / 6 = 0.33 < 0.375 -> the root.
    assert planner.choose(tree, {r0, r1}, [s1] * 5) == 0


def test_a_step_without_an_action_is_a_stop_with_an_outcome():
    calls = []

    def step(tree, node):
        calls.append(node)
        if len(calls) == 1:
            return Step([7], [-1.0], done=True)  # first rollout: one answer action
        return Step([], [], finish_reason="empty_generation")  # the fork at the root generates nothing

    tree = grow_tree_sync(RolloutTree([1], 4), CARLConfig(n0=1, n_forks=1), step, lambda t, n: float(n))
    # The fork's sample at the expanded root is a terminal child with an empty action, scored like any leaf.
    (stop,) = [n for n in tree.nodes if n.is_stop]
    assert stop.parent == 0 and stop.finish_reason == "empty_generation" and stop.reward == float(stop.id)
    assert len(tree.leaves()) == 2 and ended(tree) == 2
    tree.validate()
    # A root that cannot take any action: merged, its one child (a stop sampled twice) is folded into it, and the
    # root becomes the only leaf; unmerged, each root rollout is a stop of its own. A context overflow closes the
    # state, so no fork is started at all.
    overflow = lambda t, n: Step([], [], finish_reason="context_overflow")  # noqa: E731
    lone = grow_tree_sync(RolloutTree([1], 4, merge=True), CARLConfig(n0=2, n_forks=3), overflow, lambda t, n: 0.0)
    assert lone.leaves() == [0] and lone.root.finish_reason == "context_overflow" and len(lone.nodes) == 1
    apart = grow_tree_sync(RolloutTree([1], 4), CARLConfig(n0=2, n_forks=3, merge=False), overflow, lambda t, n: 0.0)
    assert apart.leaves() == [1, 2] and all(n.is_stop for n in apart.nodes[1:]) and apart.fork_points == []


def test_at_most_k_forks_run_at_once():
    from carl_core import grow_tree

    running, peak = {"n0": set(), "forks": set()}, {"n0": 0, "forks": 0}

    class Env:
        async def step(self, tree, node, draw):
            phase = "n0" if draw.rollout < 4 else "forks"
            running[phase].add(draw.rollout)
            peak[phase] = max(peak[phase], len(running[phase]))
            for _ in range(5 * (draw.rollout % 3 + 1)):  # slow (forks overlap), uneven (they end out of order)
                await asyncio.sleep(0)
            done = tree.nodes[node].depth >= 2
            if done:
                running[phase].discard(draw.rollout)
            return Step([3 + draw.rollout], [-1.0], [1], done=done)

        async def score(self, tree, leaf):
            return 0.0

    for k in (1, 3, 8):
        peak.update(n0=0, forks=0)
        config = CARLConfig(n0=4, n_forks=8, forks_in_flight=k, max_actions=5)
        tree = asyncio.run(grow_tree(RolloutTree([1], 5), ForkPlanner(config), Env()))
        assert peak["n0"] == 4 and 1 <= peak["forks"] <= k and len(tree.fork_points) == 8
        # K = 8: forks 4 .. 8 (rollouts i with i - K <= 0) wait for root rollout 0 alone and run together; the rest
        # wait for root rollouts 1 .. 3, which are slower than those five forks.
        assert peak["forks"] == {1: 1, 3: peak["forks"], 8: 5}[k]


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
    assert ForkPlanner(CARLConfig(n0=2, n_forks=1)).choose(tree, set()) == 1


# ------------------------------------------------------------------- selection=spread (Eq. 12'), merged counts
def wrong_branch_tree():
    """The demo's failure case in small: the root's two actions split the reward, the deeper branch is uniform.

        0 -> 1 (h 0.8) -> 3 (R 0.1)         V3 = V5 = V4 = V1 = 0.1, V2 = 1.1, V0 = 0.6
             1 -> 4 (h 0.8) -> 5 (h 1.0, R 0.1)
        0 -> 2 (h 0.2, R 1.1)
    Root h_hat = (0.8 + 0.2) / 2 = 0.5, state 1's = 0.8, state 4's = 1.0.
    """
    return build_tree(
        [(0, [-0.8], None), (0, [-0.2], 1.1), (1, [-0.8], 0.1), (1, [-0.8], None), (4, [-1.0], 0.1)], max_actions=8
    )


def criticality_of(tree, prior_weight=2.0):
    from carl_core import compute_node_values, compute_state_entropy, pack_trees

    a = pack_trees([tree])
    h_hat, n_hat = compute_state_entropy(a.parent, a.action_entropy, a.count)
    v = compute_node_values(a.parent, a.reward, a.is_leaf, a.depth, count=a.count, has_outcome=a.has_outcome)
    cand = ForkPlanner.forkable(tree)
    return compute_outcome_criticality(a.parent, v, a.count, h_hat, cand, prior_weight), h_hat, n_hat, cand


def test_outcome_criticality_by_hand():
    c, h_hat, n_hat, cand = criticality_of(wrong_branch_tree())
    assert cand.tolist() == [True, True, False, False, True, False] and n_hat[[0, 1, 4]].tolist() == [2, 2, 1]
    # Prior h~ = h_hat / max candidate h_hat (1.0): root 0.5, state 1 0.8, state 4 1.0.
    # Spread: root's children 0.1 and 1.1 around 0.6 -> sigma 0.5; leaves span 0.1..1.1 -> half range 0.5 -> 1.
    # State 1's children agree (0.1, 0.1) -> 0. State 4 has one sample -> prior alone.
    # lambda = 2: C0 = (2 * 0.5 + 2 * 1) / 4 = 0.75, C1 = (2 * 0.8 + 0) / 4 = 0.4, C4 = 1.0.
    assert c.tolist() == pytest.approx([0.75, 0.4, 0.0, 0.0, 1.0, 0.0])
    # A larger lambda keeps more of the prior: lambda = 6 -> C0 = (3 + 2) / 8, C1 = 4.8 / 8.
    assert criticality_of(wrong_branch_tree(), 6.0)[0][[0, 1]].tolist() == pytest.approx([5 / 8, 4.8 / 8])


def test_spread_returns_to_the_split_root_where_density_stays_in_the_uniform_branch():
    c, h_hat, n_hat, cand = criticality_of(wrong_branch_tree())
    # Density h_hat / n_hat: root 0.25, state 1 0.4, state 4 1.0 -> 4; then (4 forked once more) 0.5 -> 4 again.
    assert compute_fork_points(h_hat, n_hat, cand, 2) == [4, 4]
    # Spread C / n: root 0.375, state 1 0.2, state 4 1.0 -> 4; its virtual n = 2 gives 0.5 -> 4 again ...
    assert compute_fork_points(c, n_hat, cand, 2, "spread") == [4, 4]
    # ... but once state 4's second outcome is seen and agrees (R 0.1): C = 2 * 1.0 / 4 = 0.5, C / n = 0.25 < 0.375.
    tree = wrong_branch_tree()
    tree.set_reward(tree.add_action(4, [77], [-1.0], done=True, finish_reason="answer"), 0.1)
    c, h_hat, n_hat, cand = criticality_of(tree)
    assert compute_fork_points(c, n_hat, cand, 1, "spread") == [0]
    assert compute_fork_points(h_hat, n_hat, cand, 1) == [4]  # density: 1.0 / 2 = 0.5 is still the largest


def test_planner_spread_sees_merged_counts_and_matches_the_pure_function():
    # Every root sample is the same action (h = 0.05), so with merging the root has one child sampled twice.
    def step(tree, node):
        d = tree.nodes[node].depth
        if d == 0:
            return Step([10], [-0.05], [5])
        return Step([20 + len(tree.nodes)], [-1.5], done=True, finish_reason="answer")

    config = CARLConfig(n0=2, n_forks=1, max_actions=4, selection="spread")
    tree = RolloutTree([1], 4, merge=True)
    planner = ForkPlanner(config)
    for rollout in (tree.start_rollout(0), tree.start_rollout(0)):
        asyncio.run(rollout_sync(tree, rollout, step))
    assert tree.nodes[1].count == 2 and len(tree.nodes[1].children) == 2  # two samples merged; two leaves below
    c, h_hat, n_hat, cand = criticality_of(tree, config.spread_prior)
    assert n_hat[0] == 2  # the fork rule sees the two samples at the root
    fork = planner.choose(tree, {0, 1})
    assert fork == compute_fork_points(c, n_hat, cand, 1, "spread")[0] == 1


async def rollout_sync(tree, rollout, step):
    from carl_core import rollout_from

    from .support import SyncEnvironment

    return await rollout_from(tree, rollout, SyncEnvironment(step, lambda t, n: float(n % 2)))


def test_a_duplicate_rollout_into_a_finished_leaf_is_not_scored_again():
    scored = []

    def score(tree, leaf):
        scored.append(leaf)
        return 1.0

    config = CARLConfig(n0=3, n_forks=0, max_actions=2)
    tree = grow_tree_sync(
        RolloutTree([1], 2, merge=True),
        config,
        lambda t, n: Step([4], [-0.1], done=True, finish_reason="answer"),
        score,
    )
    assert len(tree.nodes) == 2 and tree.nodes[1].count == 3 and ended(tree) == 3
    assert scored == [1]
