"""The demo's numbers: the trainer's metrics, the shares of trees without signal, and the summary table that prints
them with their noise."""

import json
import math

import pytest

from recipe.carl.tiny.noise import binomial_se
from recipe.carl.tiny.report import format_table, read_metrics, tree_shares, val_accuracy_key


def test_tree_shares_weight_each_step_by_its_trees_and_trained_actions():
    rows = [
        {"step": 1, "carl/questions": 16, "carl/degenerate_tree_fraction": 0.5, "carl/zero_advantage_fraction": 1.0,
         "carl/actions_trained_per_question": 1.0},
        {"step": 2, "carl/questions": 48, "carl/degenerate_tree_fraction": 0.25, "carl/zero_advantage_fraction": 0.0,
         "carl/actions_trained_per_question": 3.0},
        {"step": 3, "val-aux/synthhop/em/mean@4": 0.3},
    ]  # fmt: skip
    shares = tree_shares(rows)
    assert shares["degenerate_tree_fraction"] == pytest.approx((16 * 0.5 + 48 * 0.25) / 64)  # one tree per question
    assert shares["zero_advantage_fraction"] == pytest.approx(16 / (16 + 144))  # 16 of 16 + 144 trained actions
    # GRPO logs its groups, under the same weights.
    grpo = [{"step": 1, "carl/questions": 4, "carl/no_signal_group_fraction": 0.25, "carl/zero_advantage_fraction": 0.5,
             "carl/actions_trained_per_question": 8.0}]  # fmt: skip
    assert tree_shares(grpo) == {"degenerate_tree_fraction": 0.25, "zero_advantage_fraction": 0.5}
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
    grpo = format_table(summary(algo="grpo", degenerate_tree_fraction=0.3, zero_advantage_fraction=None))
    assert "groups with no signal (all rewards equal)  30%" in grpo and "- (not logged)" in grpo
