"""The demo's numbers with their noise: standard errors, the paired greedy change, the shares of trees without
signal, and the summary table that prints them."""

import json
import math

import pytest

from recipe.carl.tiny.report import (
    binomial_se,
    change_text,
    curve_se,
    format_table,
    paired_change,
    read_metrics,
    tree_shares,
    val_accuracy_key,
    validation_size,
)


def test_binomial_se_of_a_mean_at_k():
    # 100 questions x 4 episodes at 30 %: sqrt(0.3 * 0.7 / 400) = 2.29 points; greedy 53 % of 100: 4.99 points.
    assert binomial_se(0.3, 100 * 4) == pytest.approx(0.022913, abs=1e-6)
    assert binomial_se(0.53, 100) == pytest.approx(0.049910, abs=1e-6)
    assert binomial_se(0.0, 50) == 0.0 and binomial_se(1.0, 50) == 0.0
    with pytest.raises(ValueError, match="n >= 1 and p in \\[0, 1\\]"):
        binomial_se(1.2, 10)


def test_a_greedy_change_is_paired_over_the_same_questions():
    # 100 questions: 5 flip right -> wrong, none the other way (53 % -> 48 %).
    before = [1.0] * 53 + [0.0] * 47
    after = [1.0] * 48 + [0.0] * 52
    delta, se = paired_change(before, after)
    assert delta == pytest.approx(-0.05)
    d = [-1.0] * 5 + [0.0] * 95
    mean = sum(d) / 100
    assert se == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 99) / 10)  # sd(d) / sqrt(n)
    assert se < math.hypot(binomial_se(0.53, 100), binomial_se(0.48, 100))  # pairing removes the shared questions
    with pytest.raises(ValueError, match="equally long"):
        paired_change([1.0], [1.0, 0.0])


def test_change_text_says_whether_a_change_exceeds_twice_its_noise():
    assert change_text(-0.05, 0.022, "paired") == "-5.0 ± 2.2 points (paired; more than 2 s.e.)"
    assert change_text(0.013, 0.032, "independent") == "+1.3 ± 3.2 points (independent; within noise)"
    assert change_text(0.03, 0.02, "paired") == "+3.0 ± 2.0 points (paired; within noise)"  # 1.5 s.e.


def test_curve_se_follows_the_validation_size_also_of_older_summaries():
    new = {"n_questions": 100, "episodes_per_question": 4, "curve": {"accuracy": [0.3, 0.36]}}
    old = {"config": {"n_test": 100}, "accuracy_metric": "val-aux/synthhop/em/mean@4", "curve": {"accuracy": [0.3]}}
    assert validation_size(new) == validation_size(old) == (100, 4)
    assert curve_se(new) == [binomial_se(0.3, 400), binomial_se(0.36, 400)]
    assert curve_se(old) == [binomial_se(0.3, 400)]


def test_tree_shares_weight_each_step_by_its_trees_and_trained_actions():
    rows = [
        {"step": 1, "carl/trees": 16, "carl/degenerate_tree_fraction": 0.5, "carl/zero_advantage_fraction": 1.0,
         "carl/actions_trained_per_tree": 1.0},
        {"step": 2, "carl/trees": 16, "carl/degenerate_tree_fraction": 0.25, "carl/zero_advantage_fraction": 0.0,
         "carl/actions_trained_per_tree": 3.0},
        {"step": 3, "val-aux/synthhop/em/mean@4": 0.3},
    ]  # fmt: skip
    shares = tree_shares(rows)
    assert shares["degenerate_tree_fraction"] == pytest.approx(0.375)
    assert shares["zero_advantage_fraction"] == pytest.approx(16 / 64)  # 16 of 16 + 48 trained actions
    assert tree_shares([{"step": 1, "carl/questions": 2}]) == {
        "degenerate_tree_fraction": None,
        "zero_advantage_fraction": None,
    }


def test_metrics_file_reading_skips_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "data": {"val-aux/synthhop/em/mean@4": 0.3}}) + '\n{"step": 1, "da')
    rows = read_metrics(path)
    assert rows == [{"step": 0, "val-aux/synthhop/em/mean@4": 0.3}]
    assert val_accuracy_key(rows) == "val-aux/synthhop/em/mean@4"


def summary(**changes):
    base = {
        "algo": "carl",
        "config": {"temperature": 0.7, "n_test": 100},
        "sft": {"steps": 6000, "shipped": "x"},
        "accuracy_metric": "val-aux/synthhop/em/mean@4",
        "n_questions": 100,
        "episodes_per_question": 4,
        "accuracy_before": 0.31,
        "accuracy_after": 0.36,
        "accuracy_se": [binomial_se(0.31, 400), binomial_se(0.36, 400)],
        "accuracy_change": [0.05, math.hypot(binomial_se(0.31, 400), binomial_se(0.36, 400))],
        "greedy_before": 0.53,
        "greedy_after": 0.48,
        "greedy_se": [binomial_se(0.53, 100), binomial_se(0.48, 100)],
        "greedy_change": [-0.05, 0.0219],
        "degenerate_tree_fraction": 0.37,
        "zero_advantage_fraction": 0.58,
        "curve": {"actions_trained": [0, 5300]},
        "policy_rl": "run/policy_rl",
        "wall_s": 540.0,
        "phases_s": {"RL steps": 300.0, "validations": 80.0},
        "learning_curve": "run/learning_curve.png",
        "tree_picture": "run/tree.png",
    }
    return {**base, **changes}


def test_the_table_names_the_noise_and_the_shares_without_signal():
    table = format_table(summary())
    assert "31.0 ± 2.3 % -> 36.0 ± 2.4 % (100 questions x 4 episodes)" in table
    assert "53.0 ± 5.0 % -> 48.0 ± 5.0 % (100 questions)" in table
    assert "-5.0 ± 2.2 points (paired, same questions; more than 2 s.e.)" in table
    assert "+5.0 ± 3.3 points (independent samples; within noise)" in table
    assert "trees with no signal (all leaves equal)  37%" in table
    assert "trained actions with advantage 0" in table and "58%" in table
    assert "9.0 min (RL steps 300 s, validations 80 s)" in table
    grpo = format_table(summary(algo="grpo", degenerate_tree_fraction=None, zero_advantage_fraction=None))
    assert "- (GRPO scores no trees)" in grpo
