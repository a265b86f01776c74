"""The step-level fork pool (issue 32 item 1): the rule and the allocation by hand, the barrier, exact budgets, a
failing tree, and the agent loop growing pooled trees."""

import asyncio

import pytest

from carl_core import CARLConfigError
from recipe.carl.pool import ForkPool, PoolSettings, allocate, compute_tree_value, pool_metrics


def test_tree_value_by_hand():
    # Rewards 1, 0 (each once) and 1 (twice): mean 3/4, spread (1/16 * 3 + 9/16) = 12/16 = 0.75; with alpha = 2 and a
    # prior variance of 0.25: (0.75 + 0.5) / (4 + 2) = 1.25 / 6.
    assert compute_tree_value([1.0, 0.0, 1.0], [1, 1, 2], 2.0, 0.25) == pytest.approx(1.25 / 6)
    # All outcomes agree: only the prior's share is left, and it shrinks with the samples.
    assert compute_tree_value([0.0, 0.0], [3, 1], 2.0, 0.25) == pytest.approx(0.5 / 6)


def test_allocation_by_hand():
    # Values 0.3, 0.0, 0.1 with 3 samples each. Worth of the next extra: v / (n + j) - v / (n + j + 1):
    # tree 0: 0.3/12 = 0.025, then 0.3/20 = 0.015, then 0.01; tree 2: 0.1/12 = 0.0083; tree 1: 0.
    # Four extras: 0, 0, 0 (0.025, 0.015, 0.01 > 0.0083), then... tree 0's fourth is 0.3/42 = 0.0071 < 0.0083: tree 2.
    assert allocate([0.3, 0.0, 0.1], [3, 3, 3], 4) == [3, 0, 1]
    assert sum(allocate([0.2, 0.2, 0.2], [2, 5, 2], 7)) == 7  # exact budget
    assert allocate([0.2, 0.2], [2, 2], 1) == [1, 0]  # ties: the lowest index
    assert allocate([], [], 5) == [] and allocate([1.0], [1], 0) == [0]


def test_settings_are_checked_by_name():
    assert PoolSettings.from_value(None) is None and PoolSettings.from_value(False) is None
    assert PoolSettings.from_value({"floor": 3}).floor == 3
    with pytest.raises(CARLConfigError, match=r"fork_pool has unknown key\(s\) \['flor'\]"):
        PoolSettings.from_value({"flor": 3})
    with pytest.raises(CARLConfigError, match="fork_pool=7 must be null"):
        PoolSettings.from_value(7)
    with pytest.raises(CARLConfigError, match="prior=0 must be a number > 0"):
        PoolSettings(prior=0)
    with pytest.raises(CARLConfigError, match="GRPO needs floor >= 2"):
        PoolSettings(floor=1, group=8).check(6, grpo=True)
    with pytest.raises(CARLConfigError, match=r"floor <= n_forks \(7 > 6"):
        PoolSettings(floor=7).check(6, grpo=False)


SETTINGS = PoolSettings(floor=1, prior=1.0)


def run_barrier(order, settings=SETTINGS, fail=(), share=4, late=()):
    """Three trees join, then report (or fail) in `order` (yields before each); returns what each got."""

    async def main():
        pool = ForkPool(settings, share)
        for key in ("a", "b", "c"):
            pool.join(key)
        outcomes = {"a": ([1.0, 0.0], [1, 1]), "b": ([0.0, 0.0], [1, 1]), "c": ([1.0, 1.0, 0.0], [1, 1, 1])}

        async def tree(key, delay):
            for _ in range(delay):
                await asyncio.sleep(0)
            if key in fail:
                pool.leave(key)
                return None
            if key in late:
                await asyncio.sleep(0.3)
            return await pool.report(key, *outcomes[key], used=1)

        got = await asyncio.gather(*(tree(k, order.index(k)) for k in ("a", "b", "c")))
        return dict(zip("abc", got, strict=True)), pool

    return asyncio.run(main())


def test_the_barrier_allocates_the_same_whoever_reports_first():
    results = {tuple(o): run_barrier(o)[0] for o in (["a", "b", "c"], ["c", "b", "a"], ["b", "a", "c"])}
    first = next(iter(results.values()))
    assert all(r == first for r in results.values())
    # Budget: 3 trees x 4 - 3 used = 9 extras, all dealt; the disagreeing trees (a, c) get more than b.
    assert sum(first.values()) == 9 and first["b"] < min(first["a"], first["c"])


def test_a_failing_tree_releases_its_share_and_nothing_hangs():
    got, pool = run_barrier(["a", "b", "c"], fail=("b",))
    # 3 x 4 budget, 2 used by the two that reported: 10 extras between a and c.
    assert got["b"] is None and got["a"] + got["c"] == 10
    assert pool.stats() == {"totals": [1 + got["a"], 1 + got["c"]], "left_out": 1}


def test_a_tree_too_late_for_the_barrier_gets_no_extra():
    got, _ = run_barrier(["a", "b", "c"], settings=PoolSettings(floor=1, prior=1.0, wait_s=0.05), late=("c",))
    assert got["c"] == 0 and got["a"] + got["b"] == 10  # c's share went to the others


def test_joining_after_the_allocation_is_refused():
    _, pool = run_barrier(["a", "b", "c"])
    with pytest.raises(RuntimeError, match="joined the fork pool after its allocation"):
        pool.join("d")


def test_pool_metrics_by_hand():
    recs = [{"total": 2, "floor": 2}, {"total": 9, "floor": 2}, {"total": 4, "floor": 2}, None]
    assert pool_metrics(recs) == {
        "carl/pool_per_tree_min": 2.0, "carl/pool_per_tree_median": 4.0, "carl/pool_per_tree_max": 9.0,
        "carl/pool_at_floor_fraction": pytest.approx(1 / 3), "carl/pool_total": 15.0, "carl/pool_left_out": 0.0,
    }  # fmt: skip
    assert pool_metrics([None]) == {}
