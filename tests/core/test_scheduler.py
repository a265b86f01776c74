"""Forks in flight (issue 29): K = 1 is Alg. 1, fork choice and the finished tree do not depend on the order in which
concurrent rollouts finish, and merged rollouts that end without an action never crash a tree (issue 28)."""

import asyncio
import random

import pytest

from carl_core import CARLConfig, ForkPlanner, RolloutTree, describe_tree, grow_tree, score_trees

from .support import ScriptedEnvironment, ended, reference_alg1


def grow(config, env, merge=None):
    merge = config.merge if merge is None else merge
    tree = RolloutTree([1, 2], config.max_actions, uid="t", merge=merge)
    return asyncio.run(grow_tree(tree, ForkPlanner(config, random.Random(0)), env))


def content(tree):
    """A tree as its nodes' (prefix, count, lost, terminal, finish, reward) in canonical order, and its fork points."""
    nodes = [(tuple(tree.prefix_ids(n.id)), n.count, n.lost, n.terminal, n.finish_reason, n.reward) for n in tree.nodes]
    return nodes, [tuple(tree.prefix_ids(s)) for s in tree.fork_points]


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("n0", [1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_one_fork_in_flight_is_alg1_as_written(seed, n0, merge):
    config = CARLConfig(n0=n0, n_forks=8, max_actions=4, merge=merge)
    expected = reference_alg1([1, 2], config, ScriptedEnvironment(seed))
    got = grow(config, ScriptedEnvironment(seed))
    assert content(got)[1] == [tuple(expected.prefix_ids(s)) for s in expected.fork_points]
    expected.canonicalize()
    assert content(got) == content(expected)


@pytest.mark.parametrize("k", [1, 2, 3, 16])
@pytest.mark.parametrize(("merge", "selection"), [(False, "density"), (True, "density"), (True, "spread")])
def test_the_tree_does_not_depend_on_which_rollout_finishes_first(k, merge, selection):
    # The same scripted policy, run with three different orders of completion (random numbers of event-loop yields
    # per step, i.e. a server whose latency varies): fork points, node ids and every node's content are identical.
    config = CARLConfig(n0=3, n_forks=10, max_actions=5, merge=merge, forks_in_flight=k, selection=selection)
    trees = []
    for shuffle in range(3):
        rng = random.Random(shuffle)
        lag = {}
        env = ScriptedEnvironment(7, yields=lambda draw: lag.setdefault(draw, rng.randrange(6)))  # noqa: B023
        tree = grow(config, env)
        trees.append((content(tree), describe_tree(tree), tree.fork_points, tree.rollout_start, tree.rollout_leaf))
    assert trees[0] == trees[1] == trees[2]
    assert len(trees[0][2]) == 10


def test_fork_j_sees_exactly_the_forks_up_to_j_minus_k():
    # K = 2: fork j is chosen once fork j - 2 has ended, from the N0 rollout and forks 0 .. j - 2 (fork j - 1 is only a
    # virtual count at its start state), however fast fork j - 1 was. The planner records what each choice saw.
    seen = []

    class Recording(ForkPlanner):
        def choose(self, tree, rollouts, running=()):
            seen.append((sorted(rollouts), len(running)))
            return super().choose(tree, rollouts, running)

    config = CARLConfig(n0=1, n_forks=5, max_actions=4, forks_in_flight=2)
    env = ScriptedEnvironment(3, yields=lambda draw: 0 if draw.rollout % 2 else 5)  # odd forks finish first
    asyncio.run(grow_tree(RolloutTree([1], 4), Recording(config), env))
    assert seen == [([0], 0), ([0], 1), ([0, 1], 1), ([0, 1, 2], 1), ([0, 1, 2, 3], 1)]


# --------------------------------------------------------------------- merged rollouts that end without an action
def stops_at_depth_one(reason, which):
    """Both N0 rollouts sample the same first action (merged into one state X); at X, the rollouts in `which` take no
    action (`reason`), the others answer."""

    def stop(tree, node, draw):
        return reason if tree.nodes[node].depth == 1 and draw.rollout in which else None

    return stop


@pytest.mark.parametrize("reason", ["empty_generation", "context_overflow", "no_action"])
@pytest.mark.parametrize("order", [(0, 5), (5, 0)])
def test_merged_rollouts_that_stop_at_the_same_state_end_there(reason, order):
    # Both stop at X: X becomes a leaf reached twice (one stop sampled twice, folded into X), whichever ends first.
    config = CARLConfig(n0=2, n_forks=0, max_actions=4, merge=True)
    env = ScriptedEnvironment(0, vocab=1, p_answer=0.0, stop=stops_at_depth_one(reason if reason != "no_action" else
                              None, {0, 1}), yields=lambda draw: order[draw.rollout])  # fmt: skip
    if reason == "no_action":  # an environment that gives no reason at all
        env.stop = lambda tree, node, draw: "" if tree.nodes[node].depth == 1 else None
    tree = grow(config, env)
    assert [n.count for n in tree.nodes] == [1, 2] and tree.nodes[1].terminal
    assert tree.nodes[1].finish_reason == (reason if reason != "no_action" else "no_action")
    assert ended(tree) == 2 and env.scored == [2]  # the stop is scored once (merged)
    tree.validate()


@pytest.mark.parametrize("reason", ["empty_generation", "context_overflow"])
@pytest.mark.parametrize("order", [(0, 5), (5, 0)])
def test_a_merged_rollout_that_stops_beside_one_that_acts(reason, order):
    # Rollout 0 stops at X, rollout 1 answers there: X keeps both samples, a stop child and an answer child, and both
    # orders of completion give the same tree (before issue 28 this raised TreeError or RuntimeError).
    config = CARLConfig(n0=2, n_forks=0, max_actions=4, merge=True)
    env = ScriptedEnvironment(0, vocab=1, p_answer=0.0, stop=stops_at_depth_one(reason, {0}),
                              yields=lambda draw: order[draw.rollout])  # fmt: skip
    env.p_answer = 1.0  # the acting rollout answers at once; the first action is still the shared search
    first = lambda tree, node, draw: None if tree.nodes[node].depth else "search"  # noqa: E731, F841
    tree = grow(config, ScriptedFirstSearch(env))
    x = tree.nodes[1]
    assert x.count == 2 and len(x.children) == 2
    stop, answer = (tree.nodes[c] for c in x.children)
    assert stop.is_stop and stop.finish_reason == reason and answer.finish_reason == "answer"
    assert ended(tree) == 2
    # V(X) is the mean of its two samples' outcomes, and X weighs 2 at the root.
    scored = score_trees([tree], config)
    assert scored.node_value[1] == pytest.approx((stop.reward + answer.reward) / 2)
    assert not bool(scored.trained[stop.id])  # a stop has no tokens to train


class ScriptedFirstSearch:
    """Wraps a ScriptedEnvironment so that the first action of every rollout is the same search (a merge)."""

    def __init__(self, env):
        self.env = env

    async def step(self, tree, node, draw):
        from carl_core import Step

        if tree.nodes[node].depth == 0:
            for _ in range(self.env.yields(draw)):
                await asyncio.sleep(0)
            return Step([42], [-0.3], [99])
        return await self.env.step(tree, node, draw)

    async def score(self, tree, leaf):
        return await self.env.score(tree, leaf)


# ------------------------------------------------------------------------------- the tail: a straggler's boost
def grow_with_tail(config, env, tail_k, set_after):
    """Grows a tree with `grow_tree(tail=...)`, the event set once `set_after` rollouts have ended (None: never);
    returns the tree, the most rollouts in flight after the N0 phase before and after the event, and what each fork
    choice saw."""
    from carl_core.forking import Tail

    tail, ended_count, running, peak, seen = Tail(asyncio.Event(), tail_k), [0], set(), {False: 0, True: 0}, []

    class Counting(type(env)):
        async def step(self, tree, node, draw):
            running.add(draw.rollout)
            if draw.rollout >= config.n0:
                key = tail.event.is_set()
                peak[key] = max(peak[key], sum(r >= config.n0 for r in running))
            step = await super().step(tree, node, draw)
            if step.done or not step.token_ids or tree.nodes[node].depth + 1 >= tree.max_actions:
                running.discard(draw.rollout)
                ended_count[0] += 1
                if set_after is not None and ended_count[0] >= set_after:
                    tail.event.set()
            return step

    class Recording(ForkPlanner):
        def choose(self, tree, rollouts, running=()):
            seen.append((len(rollouts), len(running)))
            return super().choose(tree, rollouts, running)

    env.__class__ = Counting
    tree = RolloutTree([1, 2], config.max_actions, uid="t", merge=config.merge)
    asyncio.run(grow_tree(tree, Recording(config, random.Random(0)), env, tail=tail))
    return tree, peak, seen


def test_a_tail_that_never_comes_changes_nothing_and_one_from_the_start_is_its_k():
    config = CARLConfig(n0=2, n_forks=10, max_actions=5, forks_in_flight=2)
    lag = lambda draw: (draw.rollout * 7 + draw.turn * 3) % 5  # noqa: E731
    plain = grow(config, ScriptedEnvironment(4, yields=lag))
    never, _, _ = grow_with_tail(config, ScriptedEnvironment(4, yields=lag), 6, None)
    assert content(never) == content(plain)
    wide = grow(CARLConfig(n0=2, n_forks=10, max_actions=5, forks_in_flight=6), ScriptedEnvironment(4, yields=lag))
    always, _, _ = grow_with_tail(config, ScriptedEnvironment(4, yields=lag), 6, 0)
    assert content(always) == content(wide)


@pytest.mark.parametrize("set_after", [1, 3, 5, 8])
def test_the_tail_raises_k_from_when_it_comes_and_never_beyond_its_own(set_after):
    # K = 2 before the boost, 5 after: never more forks in flight than that, and every choice sees at least
    # rollouts 0 .. i - 5. Forks that started under K = 2 but whose start state a later, wider choice cannot see
    # count at their nearest state that it can see (no crash, and the virtual counts still add up).
    config = CARLConfig(n0=2, n_forks=12, max_actions=5, forks_in_flight=2)
    lag = lambda draw: 6 if draw.rollout % 3 == 0 else draw.turn % 2  # noqa: E731
    tree, peak, seen = grow_with_tail(config, ScriptedEnvironment(9, yields=lag), 5, set_after)
    assert peak[False] <= 2 and peak[True] <= 5 and len(tree.fork_points) == 12
    for i, (saw, running) in enumerate(seen, start=config.n0):
        assert saw >= max(i - 5 + 1, 1) and saw + running == i
    assert any(i - saw >= 2 for i, (saw, _) in enumerate(seen, start=config.n0))  # the boost did widen some choices
    tree.validate()


def test_waiting_for_the_tail_wakes_once_per_ended_rollout(monkeypatch):
    # While the boost has not come, a fork waits for its rollouts or the boost, whichever first. Each wait must end
    # because one more rollout ended (or the boost came): waiting again on a rollout that has already ended would
    # return at once and spin the event loop (the simulated servers' virtual clock then never moves on).
    config = CARLConfig(n0=2, n_forks=10, max_actions=5, forks_in_flight=2)
    lag = lambda draw: 20 + (draw.rollout * 7 + draw.turn * 3) % 5  # noqa: E731  (20+ loop turns a step)
    calls, wait = [0], asyncio.wait

    async def counting(*args, **kwargs):
        calls[0] += 1
        return await wait(*args, **kwargs)

    monkeypatch.setattr(asyncio, "wait", counting)
    grow_with_tail(config, ScriptedEnvironment(4, yields=lag), 6, None)
    assert 0 < calls[0] <= config.n0 + config.n_forks
