"""`benchmarks/fork_rules.py`: the bias measurement on the test MDP and the pilot on training questions."""

import math
import statistics

import pytest

from benchmarks import fork_rules


def test_random_forks_are_unbiased_and_each_row_says_its_bias():
    values = fork_rules.mdp_root_values("random", merge=True, trees=400, seed=3)
    mean, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    assert abs(mean - 0.625) < 4 * se
    rows = fork_rules.bias(trees=60)
    rules = fork_rules.RULES + ("pool",)
    assert {(r["selection"], r["merge"]) for r in rows} == {(s, m) for s in rules for m in (False, True)}
    assert all((r["batch"], r["floor"]) == (16, 2) for r in rows if r["selection"] == "pool")
    for r in rows:
        assert r["bias"] == pytest.approx(r["mean_root_value"] - 0.625)
        assert r["bias_in_se"] == pytest.approx(r["bias"] / r["se"])


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match="--trees 1 must be >= 2"):
        fork_rules.main(["bias", "--trees", "1"])
    with pytest.raises(SystemExit, match="every --priors value > 0"):
        fork_rules.main(["pilot", "--priors", "0"])


@pytest.mark.slow
def test_pilot_counts_signal_on_training_questions(tmp_path):
    rows = fork_rules.pilot(questions=3, priors=[8.0], root=tmp_path)
    assert [r["selection"] for r in rows] == ["random", "density", "spread"]
    for r in rows:
        assert r["trees"] == 3 and 0 < r["trained_actions"] <= r["generated_actions"]
        assert r["nonzero_per_generated"] == pytest.approx(r["nonzero_advantage_actions"] / r["generated_actions"])
        assert 0 <= r["signal_tree_share"] <= 1


def test_grpo_signal_is_counted_in_exact_arithmetic():
    from benchmarks.fork_rules import signal_of
    from carl_core import CARLConfig, RolloutTree

    # A group of eight chains all scored 0.1 (one action each) has no signal, though its float mean is not 0.1; a
    # group of 0.1, 0.1, 1.1 (two actions each) has signal on every chain: 6 of 6 actions.
    def group(rewards, depth):
        tree = RolloutTree([1], 4)
        for i, r in enumerate(rewards):
            node = 0
            for d in range(depth):
                node = tree.add_action(node, [10 + i * 10 + d], [-0.5], done=d == depth - 1, finish_reason="answer")
            tree.set_reward(node, r)
        return tree

    out = signal_of([group([0.1] * 8, 1), group([0.1, 0.1, 1.1], 2)], CARLConfig(), "grpo")
    assert out["generated_actions"] == 14 and out["nonzero_advantage_actions"] == 6
