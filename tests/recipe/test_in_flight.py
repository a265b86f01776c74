"""Sequences in flight per agent-loop worker (issue 29 item 4): the summary by hand, the counter, the metric."""

import pytest

from recipe.carl.in_flight import InFlight, in_flight_metrics, summarize


def test_summary_by_hand():
    # Count 4 on [0, 5), 2 on [5, 8), 0 on [8, 10): mean (20 + 6 + 0) / 10 = 2.6. Two windows of 5 s: means 4 and
    # (6 + 0) / 5 = 1.2 -> lowest 1.2. Ten windows of 1 s: the last two are 0.
    events = [(0.0, 4), (5.0, 2), (8.0, 0)]
    assert summarize(events, 10.0, windows=2) == pytest.approx((2.6, 1.2))
    assert summarize(events, 10.0) == pytest.approx((2.6, 0.0))
    # A change inside a window is split: 1 on [0, 1.5), 3 on [1.5, 3): windows of 1 s -> 1, (0.5 + 1.5), 3.
    assert summarize([(0.0, 1), (1.5, 3)], 3.0, windows=3) == pytest.approx(((1.5 + 4.5) / 3, 1.0))
    assert summarize([], 1.0) == (0.0, 0.0) and summarize([(2.0, 1)], 2.0) == (0.0, 0.0)


def test_the_counter_follows_each_step_and_keeps_a_few():
    now = [0.0]
    counter = InFlight(clock=lambda: now[0])
    counter.change(7, +1)  # t = 0: 1 in flight
    now[0] = 2.0
    counter.change(7, +1)  # t = 2: 2
    now[0] = 4.0
    counter.change(7, -2)  # t = 4: 0
    now[0] = 5.0
    snap = counter.snapshot(7)
    # (1 * 2 + 2 * 2 + 0 * 1) / 5 = 1.2; the last of ten 0.5 s windows is empty.
    assert snap["mean"] == pytest.approx(1.2) and snap["min"] == 0.0 and snap["end"] == 5.0
    counter.change(11, +1)
    assert set(counter.steps) == {11}  # steps older than two before the current one are dropped


def test_the_trainer_keeps_each_workers_latest_snapshot():
    snaps = [
        {"worker": 1, "end": 5.0, "mean": 9.0, "min": 1.0},  # an early tree of worker 1: superseded below
        {"worker": 1, "end": 9.0, "mean": 6.0, "min": 2.0},
        {"worker": 2, "end": 7.0, "mean": 4.0, "min": 0.5},
        None,  # a tree from an older agent loop: no snapshot
    ]
    assert in_flight_metrics(snaps) == {"carl/seqs_in_flight_mean": 5.0, "carl/seqs_in_flight_min": 0.5}
    assert in_flight_metrics([None]) == {}


def test_the_tail_boost_starts_when_few_enough_trees_are_left():
    from recipe.carl.in_flight import TailBoost, TailBoosts

    boost = TailBoost(forks_in_flight=16, share=0.25)
    tails = [boost.join() for _ in range(8)]  # 8 trees: the boost comes when ceil(0.25 * 8) = 2 still grow
    assert all(t is boost.tail for t in tails) and boost.tail.forks_in_flight == 16
    for ended in range(1, 7):
        boost.end()
        assert boost.tail.event.is_set() == (ended >= 6), ended
    one = TailBoost(forks_in_flight=8, share=0.25)
    one.join()
    assert not one.tail.event.is_set()
    one.end()  # a lone tree: ceil(0.25) = 1 may still grow, so the boost comes only when nothing is left
    assert one.tail.event.is_set()
    registry = TailBoosts()
    assert registry.get(3, 8, 0.5) is registry.get(3, 16, 0.1)  # one per step: the first call's settings
    registry.get(7, 8, 0.5)
    assert sorted(registry.steps) == [7]  # steps more than two behind are dropped
