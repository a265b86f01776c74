"""`recipe.carl.evaluate.stats`: the two-level (seed, question) bootstrap against distributions enumerated by hand,
its pairing, its fast path against the generic one, and its errors.

The hand cases have 2 seeds x 2 questions. A replicate draws 2 seeds with replacement ((0,0), (0,1), (1,0), (1,1),
each with probability 1/4) and, independently, 2 questions the same way, so there are 4 x 4 = 16 equally likely
replicates, written out in each test's comments. A replicate's mean is the mean, over its two drawn seeds, of the
seed's row mean over the two drawn questions. Percentile bounds at levels whose tail quantiles fall strictly between
two jumps of that 16-point distribution's CDF (the jumps are at multiples of 1/16) are then known exactly.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from recipe.carl.evaluate.stats import (
    Interval,
    bootstrap,
    macro_interval,
    mean_interval,
    paired_difference,
    paired_macro_difference,
    resample_indices,
)

#: Enough replicates that the empirical CDF is within ~6 standard deviations of the exact one at the tested quantiles.
MANY = 40_000

# x = [[0, 1],
#      [2, 4]]                         rows: seed 0, seed 1; columns: question 0, question 1
# question draw -> row means (seed 0, seed 1), then the 4 seed draws (0,0) (0,1) (1,0) (1,1):
#   (0,0): rows 0, 2          -> 0,    1,    1,    2
#   (1,1): rows 1, 4          -> 1,    2.5,  2.5,  4
#   (0,1): rows 0.5, 3        -> 0.5,  1.75, 1.75, 3
#   (1,0): rows 0.5, 3        -> 0.5,  1.75, 1.75, 3
# sorted: 0 | 0.5 0.5 | 1 1 1 | 1.75 x4 | 2 | 2.5 2.5 | 3 3 | 4
# CDF:    1/16, 3/16, 6/16, 10/16, 11/16, 13/16, 15/16, 16/16
X = np.array([[0.0, 1.0], [2.0, 4.0]])
X_DISTRIBUTION = {0.0: 1, 0.5: 2, 1.0: 3, 1.75: 4, 2.0: 1, 2.5: 2, 3.0: 2, 4.0: 1}  # value: replicates out of 16


def test_the_hand_enumerated_distribution_of_the_mean():
    assert sum(X_DISTRIBUTION.values()) == 16
    # The draws of resample_indices give each of the 16 replicates with probability 1/16 (each within 6 sigma).
    seed_idx, question_idx = resample_indices(2, 2, MANY, seed=1)
    counts = Counter(float(X[s][:, q].mean()) for s, q in zip(seed_idx, question_idx, strict=True))
    assert set(counts) == set(X_DISTRIBUTION)
    for value, k in X_DISTRIBUTION.items():
        p = k / 16
        assert abs(counts[value] / MANY - p) < 6 * np.sqrt(p * (1 - p) / MANY), (value, counts[value])


@pytest.mark.parametrize(
    ("level", "low", "high"),
    [
        # tails 0.1 / 0.9: 1/16 < 0.1 < 3/16 -> the 0.5 atom; 13/16 < 0.9 < 15/16 -> the 3 atom
        (0.8, 0.5, 3.0),
        # tails 0.2 / 0.8: 3/16 < 0.2 < 6/16 -> 1; 11/16 < 0.8 < 13/16 -> 2.5
        (0.6, 1.0, 2.5),
        # tails 0.025 / 0.975: below 1/16 -> the minimum 0; above 15/16 -> the maximum 4
        (0.95, 0.0, 4.0),
    ],
)
def test_mean_interval_lands_on_the_hand_derived_quantiles(level, low, high):
    interval = mean_interval(X, n_boot=MANY, seed=2, level=level)
    assert interval == Interval(estimate=1.75, low=low, high=high, level=level, n_boot=MANY)  # (0+1+2+4)/4 = 1.75


# a = [[1, 0], [1, 1]], b = [[0, 0], [1, 0]]  ->  d = a - b = [[1, 0],
#                                                              [0, 1]]
# question draw -> rows of d (seed 0, seed 1), then the 4 seed draws (0,0) (0,1) (1,0) (1,1):
#   (0,0): rows 1, 0      -> 1,   0.5, 0.5, 0
#   (1,1): rows 0, 1      -> 0,   0.5, 0.5, 1
#   (0,1), (1,0): rows 0.5, 0.5 -> 0.5 each (8 replicates)
# distribution of mean(a) - mean(b): 0 w.p. 2/16, 0.5 w.p. 12/16, 1 w.p. 2/16; CDF 2/16, 14/16, 1.
A = np.array([[1.0, 0.0], [1.0, 1.0]])
B = np.array([[0.0, 0.0], [1.0, 0.0]])


@pytest.mark.parametrize(
    ("level", "low", "high"),
    [
        (0.8, 0.0, 1.0),  # 0.1 < 2/16 -> 0; 0.9 > 14/16 -> 1
        (0.7, 0.5, 0.5),  # 2/16 < 0.15 and 0.85 < 14/16 -> both 0.5
    ],
)
def test_paired_difference_lands_on_the_hand_derived_quantiles(level, low, high):
    interval = paired_difference(A, B, n_boot=MANY, seed=3, level=level)
    assert interval == Interval(estimate=0.5, low=low, high=high, level=level, n_boot=MANY)  # 3/4 - 1/4


def test_a_constant_shift_gives_a_zero_width_interval_where_unpaired_draws_would_not():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, size=(3, 40)).astype(float)  # EM of 3 seeds on 40 questions
    c = 0.25  # dyadic: a + c and a - (a + c) are exact
    assert paired_difference(a, a + c) == Interval(-c, -c, -c, 0.95, 10_000)
    # Drawing the two arms' seeds and questions independently (no pairing) leaves each arm's own spread in the
    # difference: the same data then give a wide interval (about +-0.13 here: two means of 120 coin flips).
    seeds_a, questions_a = resample_indices(3, 40, 10_000, seed=0)
    seeds_b, questions_b = resample_indices(3, 40, 10_000, seed=1)
    draws = zip(seeds_a, questions_a, seeds_b, questions_b, strict=True)
    unpaired = [a[s][:, q].mean() - (a + c)[t][:, r].mean() for s, q, t, r in draws]
    low, high = np.quantile(unpaired, [0.025, 0.975])
    assert low < -c - 0.08 and high > -c + 0.08


def test_a_difference_identical_across_seeds_has_no_seed_variance():
    rng = np.random.default_rng(1)
    per_question = rng.normal(size=60)
    same = np.tile(per_question, (4, 1))  # 4 seeds, every one with the same question-level difference
    one_seed = paired_difference(per_question[None], np.zeros((1, 60)), seed=5)
    four_seeds = paired_difference(same, np.zeros((4, 60)), seed=5)
    # the question draws do not depend on n_seeds, and resampling identical seeds changes nothing
    assert four_seeds.low == pytest.approx(one_seed.low, abs=1e-12)
    assert four_seeds.high == pytest.approx(one_seed.high, abs=1e-12)
    # whereas seeds that differ add their own spread
    varied = same + rng.normal(scale=0.5, size=(4, 1))
    varied -= varied.mean() - same.mean()  # same overall mean, seed offsets only
    wide = paired_difference(varied, np.zeros((4, 60)), seed=5)
    assert wide.high - wide.low > 1.2 * (four_seeds.high - four_seeds.low)


def test_one_seed_is_the_paired_bootstrap_over_questions():
    rng = np.random.default_rng(2)
    a, b = rng.random(50), rng.random(50)
    _, question_idx = resample_indices(1, 50, 2_000, seed=7)
    replicates = [a[q].mean() - b[q].mean() for q in question_idx]  # the textbook paired bootstrap, those draws
    low, high = np.quantile(replicates, [0.05, 0.95])
    interval = paired_difference(a[None], b[None], n_boot=2_000, seed=7, level=0.9)
    assert interval.estimate == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert interval.low == pytest.approx(low, abs=1e-12) and interval.high == pytest.approx(high, abs=1e-12)


@pytest.mark.parametrize("shape", [(3, 17), (2, 9, 4)])  # with a trailing axis: k = 4 samples per question
def test_the_fast_path_gives_the_generic_paths_numbers(shape):
    rng = np.random.default_rng(3)
    a, b = rng.random(shape), rng.random(shape)
    fast, generic = mean_interval(a, n_boot=3_000, seed=4), bootstrap(np.mean, a, n_boot=3_000, seed=4)
    for field in ("estimate", "low", "high"):
        assert getattr(fast, field) == pytest.approx(getattr(generic, field), abs=1e-12)
    fast = paired_difference(a, b, n_boot=3_000, seed=4)
    generic = bootstrap(lambda x, y: np.mean(x) - np.mean(y), a, b, n_boot=3_000, seed=4)
    for field in ("estimate", "low", "high"):
        assert getattr(fast, field) == pytest.approx(getattr(generic, field), abs=1e-12)


def test_every_array_gets_the_same_draw():
    a = np.arange(12.0).reshape(3, 4)
    seen = []

    def statistic(x, y):
        seen.append((x.copy(), y.copy()))
        return 0.0

    bootstrap(statistic, a, 100 + a, n_boot=50)
    assert len(seen) == 51  # 50 replicates, then the original arrays
    assert all(np.array_equal(y, 100 + x) for x, y in seen)
    assert any(not np.array_equal(x, a) for x, _ in seen[:-1])  # they are resampled


def test_resample_indices_shapes_ranges_and_streams():
    seed_idx, question_idx = resample_indices(3, 479, 1_000, seed=0)
    assert seed_idx.shape == (1_000, 3) and question_idx.shape == (1_000, 479)
    assert seed_idx.min() == 0 and seed_idx.max() == 2 and question_idx.min() == 0 and question_idx.max() == 478
    assert np.array_equal(resample_indices(1, 479, 1_000, seed=0)[1], question_idx)  # independent of n_seeds
    assert not np.array_equal(resample_indices(3, 479, 1_000, seed=1)[1], question_idx)
    with pytest.raises(ValueError, match="n_seeds=0: must be an integer >= 1"):
        resample_indices(0, 5, 10)


def test_bad_inputs_name_the_shapes_and_the_fix():
    good = np.zeros((2, 5))
    with pytest.raises(ValueError, match=r"holds NaN \(first at index \(1, 3\)\): drop or fill those questions"):
        mean_interval(np.where(np.arange(10).reshape(2, 5) == 8, np.nan, 0.0))
    with pytest.raises(ValueError, match=r"shapes \[\(2, 5\), \(3, 5\)\] differ in \(n_seeds, n_questions\)"):
        bootstrap(lambda x, y: 0.0, good, np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"a has shape \(2, 5\) and b \(2, 5, 2\)"):
        paired_difference(good, np.zeros((2, 5, 2)))
    with pytest.raises(ValueError, match=r"shape \(5,\): need \(n_seeds, n_questions, \.\.\.\).* a\[None\]"):
        mean_interval(np.zeros(5))
    with pytest.raises(ValueError, match="n_boot=0: must be an integer >= 1"):
        mean_interval(good, n_boot=0)
    for level in (0.0, 1.0, 95):
        with pytest.raises(ValueError, match=f"level={level!r}: must be in"):
            paired_difference(good, good, level=level)


# ------------------------------------------------------------------------------------------- macro over data sets
# One seed, three questions in two data sets: A = questions 0, 1 (values 0, 1), B = question 2 (value 4).
# Macro = (mean A + mean B) / 2 = (0.5 + 4) / 2 = 2.25. A stratified replicate draws 2 questions from A and 1 from B:
#   A (0,0) -> 0: macro 2.0 (1/4);  A (1,1) -> 1: macro 2.5 (1/4);  A (0,1) or (1,0) -> 0.5: macro 2.25 (1/2).
# CDF: 2.0 at 1/4, 2.25 at 3/4, 2.5 at 1. (An unstratified draw could take question 2 three times: macro undefined,
# and a plain mean of 4.)
M = np.array([[0.0, 1.0, 4.0]])
M_STRATA = np.array(["A", "A", "B"])


def reference_macro(x, strata, seed_idx, question_idx):
    """A replicate's macro mean, written out: per drawn seed, each data set's mean over its drawn questions."""
    labels = strata[question_idx]
    per_seed = [np.mean([x[s, question_idx[labels == d]].mean() for d in dict.fromkeys(strata)]) for s in seed_idx]
    return float(np.mean(per_seed))


def test_stratified_draws_keep_each_data_set_and_land_on_the_hand_distribution():
    seed_idx, question_idx = resample_indices(1, 3, MANY, seed=1, strata=M_STRATA)
    assert (np.isin(question_idx[:, :2], [0, 1]).all(), (question_idx[:, 2] == 2).all()) == (True, True)
    counts = Counter(reference_macro(M, M_STRATA, s, q) for s, q in zip(seed_idx, question_idx, strict=True))
    for value, p in {2.0: 0.25, 2.25: 0.5, 2.5: 0.25}.items():
        assert abs(counts[value] / MANY - p) < 6 * np.sqrt(p * (1 - p) / MANY), (value, counts)
    assert set(counts) == {2.0, 2.25, 2.5}
    # tails 0.2 / 0.8 -> 2.0 and 2.5; tails 0.3 / 0.7 -> both in the 2.25 atom
    assert macro_interval(M, M_STRATA, n_boot=MANY, seed=2, level=0.6) == Interval(2.25, 2.0, 2.5, 0.6, MANY)
    interval = macro_interval(M, M_STRATA, n_boot=MANY, seed=2, level=0.4)
    assert (interval.low, interval.high) == (2.25, 2.25)


def test_macro_fast_path_gives_the_written_out_replicates():
    """3 seeds x 30 questions x 2 samples in data sets of 5, 10 and 15 questions (interleaved)."""
    rng = np.random.default_rng(0)
    x = rng.random((3, 30, 2))
    strata = np.array(["nq", "hotpotqa", "hotpotqa", "bamboogle", "hotpotqa", "nq"] * 5)
    seed_idx, question_idx = resample_indices(3, 30, 500, seed=4, strata=strata)
    per_question = x.mean(axis=2)
    replicates = [reference_macro(per_question, strata, s, q) for s, q in zip(seed_idx, question_idx, strict=True)]
    interval = macro_interval(x, strata, n_boot=500, seed=4, level=0.9)
    assert interval.low == pytest.approx(np.quantile(replicates, 0.05), abs=1e-12)
    assert interval.high == pytest.approx(np.quantile(replicates, 0.95), abs=1e-12)
    by_set = [per_question[:, strata == d].mean() for d in ("nq", "hotpotqa", "bamboogle")]
    assert interval.estimate == pytest.approx(np.mean(by_set), abs=1e-12)  # not the plain mean over questions
    assert abs(interval.estimate - per_question.mean()) > 1e-3


def test_paired_macro_difference_pairs_and_checks():
    rng = np.random.default_rng(1)
    a = rng.random((2, 12))
    strata = np.repeat(["x", "y", "z"], [2, 4, 6])
    shift = paired_macro_difference(a, a + 0.25, strata)  # weights 1/6, 1/12, 1/18: exact up to rounding
    assert [shift.estimate, shift.low, shift.high] == pytest.approx([-0.25] * 3, abs=1e-12)
    with pytest.raises(ValueError, match=r"strata has shape \(11,\): need one stratum \(data set\) per question"):
        macro_interval(a, strata[:11])
    with pytest.raises(ValueError, match="a paired difference needs one shape"):
        paired_macro_difference(a, a[..., None].repeat(2, axis=2), strata)
