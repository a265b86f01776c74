"""The noise of the demo's numbers: binomial standard errors, the paired greedy change, and when a change exceeds
twice its noise."""

import math

import pytest

from recipe.carl.tiny.noise import binomial_se, change_text, curve_se, paired_change, validation_size


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
