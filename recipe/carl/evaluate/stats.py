"""Bootstrap intervals over training seeds and held-out questions: one implementation for the evaluation's
`--baseline` comparison and the CARL-against-GRPO experiment (`benchmarks/`). numpy only.

Every array has shape `(n_seeds, n_questions, ...)`: entry `[s, q]` is what the policy trained with seed `s` scored on
held-out question `q` (trailing axes, e.g. k samples per question, are averaged by the mean statistics). A replicate
draws seeds with replacement, then questions with replacement (`resample_indices`), and applies the SAME draw to every
array. Two arms are thereby paired twice: by seed (seed `s` of each arm saw the same training question order) and by
question (both answered question `q`), so what the two arms share (a lucky seed's data order, a question's
difficulty) cancels in their difference instead of widening its interval. With one seed this is exactly the paired
bootstrap over questions: `paired_difference(a[None], b[None])`.

Why hand-written rather than `rliable` (Agarwal et al., 2021): its stratified bootstrap resamples runs independently
within each task, with nothing that pairs two algorithms' runs by seed and by question; `scipy.stats.bootstrap` pairs
along one axis only.

Several data sets at once (`strata`: each question's data set): papers report the macro average, the mean of the data
sets' means, so a data set of 125 questions weighs as much as one of 3,610. `macro_interval` and
`paired_macro_difference` resample the questions within each data set (a stratified bootstrap: every replicate keeps
each data set's size), still after the seeds, and weigh each question 1 / (data sets x its data set's questions).

Mean statistics (`mean_interval`, `paired_difference`, and their macro forms) take a fast path: a replicate's mean
over the drawn seeds and questions is `c_s @ x @ c_q / (n_seeds * n_questions)` (macro: `c_s @ (x * w) @ c_q /
n_seeds`), with `c_s`, `c_q` the draw counts, so no replicate array is built and no Python function is called per
replicate (10,000 replicates of a 4 x 479 array: ~0.1 s on one core, most of it drawing the indices; the generic
path takes 1.5-3x that: `python -m benchmarks.bench_stats`). It gives the numbers of the generic path (`bootstrap`
with `np.mean`) on the same draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A statistic with its percentile bootstrap interval."""

    estimate: float
    """The statistic on the original data."""
    low: float
    """Percentile bootstrap bounds: the (1 - level) / 2 and (1 + level) / 2 quantiles of the replicates."""
    high: float
    level: float
    """e.g. 0.95."""
    n_boot: int
    """Replicates drawn."""


def resample_indices(
    n_seeds: int, n_questions: int, n_boot: int, seed: int = 0, strata: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Two-level bootstrap draws: seeds with replacement, then held-out questions with replacement.

    The question draws come from their own stream, so they do not depend on `n_seeds`: the same `seed` gives the same
    question draws for one seed or for five (a one-seed result is the multi-seed one without seed resampling).

    Args:
        strata: each question's stratum (data set) [shape: (n_questions,)]; given, each replicate draws as many
            questions from each stratum as it has, among its own (strata in order of first appearance). None: from
            all questions.

    Returns:
        (seed_idx [shape: (n_boot, n_seeds)], question_idx [shape: (n_boot, n_questions)]), integer indices.

    Raises:
        ValueError: a count below 1, or strata of another length than the questions.
    """
    for name, value in (("n_seeds", n_seeds), ("n_questions", n_questions), ("n_boot", n_boot)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1.")
    seed_rng, question_rng = np.random.default_rng(seed).spawn(2)
    seed_idx = seed_rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    if strata is None:
        return seed_idx, question_rng.integers(0, n_questions, size=(n_boot, n_questions))
    members = stratum_members(strata, n_questions)
    question_idx = np.concatenate([m[question_rng.integers(0, len(m), size=(n_boot, len(m)))] for m in members], axis=1)
    return seed_idx, question_idx


def stratum_members(strata: np.ndarray, n_questions: int) -> list[np.ndarray]:
    """The question indices of each stratum, strata in order of first appearance.

    Raises:
        ValueError: `strata` does not have one entry per question.
    """
    labels = np.asarray(strata)
    if labels.shape != (n_questions,):
        raise ValueError(
            f"strata has shape {labels.shape}: need one stratum (data set) per question, ({n_questions},)."
        )
    _, first = np.unique(labels, return_index=True)
    return [np.flatnonzero(labels == labels[i]) for i in sorted(first)]


def _check(arrays: tuple[np.ndarray, ...], n_boot: int, level: float) -> list[np.ndarray]:
    """The arrays as float arrays of one `(n_seeds, n_questions, ...)` layout; the bootstrap's settings checked."""
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r}: must be an integer >= 1 (e.g. 10_000).")
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}: must be in (0, 1), e.g. 0.95 for a 95 % interval.")
    if not arrays:
        raise ValueError("no array given: pass at least one array of shape (n_seeds, n_questions, ...).")
    out = [np.asarray(a, dtype=float) for a in arrays]
    shapes = [a.shape for a in out]
    for i, a in enumerate(out):
        if a.ndim < 2 or 0 in a.shape[:2]:
            raise ValueError(
                f"array {i} has shape {a.shape}: need (n_seeds, n_questions, ...) with both >= 1; one seed's "
                "per-question values are a[None] (shape (1, n_questions))."
            )
        if np.isnan(a).any():
            where = tuple(int(x) for x in np.argwhere(np.isnan(a))[0])
            raise ValueError(
                f"array {i} (shape {a.shape}) holds NaN (first at index {where}): drop or fill those questions "
                "in every array first (the arrays must stay paired)."
            )
    if any(s[:2] != shapes[0][:2] for s in shapes):
        raise ValueError(
            f"the arrays' shapes {shapes} differ in (n_seeds, n_questions): they must share one (seed, question) "
            "layout, the same seeds and questions in the same order."
        )
    return out


def _interval(estimate: float, replicates: np.ndarray, level: float, n_boot: int) -> Interval:
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(estimate), float(low), float(high), float(level), int(n_boot))


def bootstrap(
    statistic: Callable[..., float], *arrays: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Percentile interval of `statistic(*arrays)` under the paired two-level bootstrap.

    Every array has shape (n_seeds, n_questions, ...) and the SAME (seed, question) layout: arrays of two arms are
    paired by seed (same question order in training) and by held-out question. Each replicate applies the same seed
    and question draw to every array: `statistic(*(a[s][:, q] for a in arrays))`. Percentile interval.

    Raises:
        ValueError: NaN in an array, arrays of different (n_seeds, n_questions), n_boot < 1, level outside (0, 1).
    """
    checked = _check(arrays, n_boot, level)
    n_seeds, n_questions = checked[0].shape[:2]
    seed_idx, question_idx = resample_indices(n_seeds, n_questions, n_boot, seed)
    replicates = np.array(
        [statistic(*(a[s][:, q] for a in checked)) for s, q in zip(seed_idx, question_idx, strict=True)], dtype=float
    )
    return _interval(statistic(*checked), replicates, level, n_boot)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of `n` items is drawn in each replicate. [shape: (n_boot, n)]"""
    n_boot = idx.shape[0]
    flat = (idx + n * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(float)


def macro_weights(strata: np.ndarray | None, n_questions: int) -> np.ndarray:
    """Each question's weight in the mean: 1 / n_questions, or with strata 1 / (strata x its stratum's size), so that
    the weighted sum is the mean of the strata's means. [shape: (n_questions,)]"""
    if strata is None:
        return np.full(n_questions, 1.0 / n_questions)
    members = stratum_members(strata, n_questions)
    weights = np.empty(n_questions)
    for m in members:
        weights[m] = 1.0 / (len(members) * len(m))
    return weights


def _mean_replicates(x: np.ndarray, n_boot: int, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    """`np.mean(x[s][:, q])` for every replicate's draw (with `strata`: the mean of the strata's means), without
    building the replicates. [shape: (n_boot,)]

    Trailing axes are averaged first (every question has as many entries, so that is the same mean); then a
    replicate's weighted sum over the drawn (seed, question) pairs is sum_s sum_q c_s[s] x[s, q] w_q c_q[q] / n_seeds,
    w the `macro_weights` (a stratified draw keeps every stratum's size, so the weights stay those of the data).
    """
    per_question = x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2)  # (n_seeds, n_questions)
    n_seeds, n_questions = per_question.shape
    seed_idx, question_idx = resample_indices(n_seeds, n_questions, n_boot, seed, strata)
    seed_counts, question_counts = _counts(seed_idx, n_seeds), _counts(question_idx, n_questions)
    if strata is None:  # the plain mean, computed as before (bit for bit the experiment's numbers)
        sums = np.einsum("bs,sq,bq->b", seed_counts, per_question, question_counts, optimize=True)
        return sums / (n_seeds * n_questions)
    weighted = per_question * macro_weights(strata, n_questions)
    return np.einsum("bs,sq,bq->b", seed_counts, weighted, question_counts, optimize=True) / n_seeds


def mean_interval(values: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> Interval:
    """The mean over seeds and questions (and any trailing axes), with its percentile interval (fast path).

    Args:
        values: [shape: (n_seeds, n_questions, ...)].
    """
    (x,) = _check((values,), n_boot, level)
    return _interval(float(x.mean()), _mean_replicates(x, n_boot, seed), level, n_boot)


def paired_difference(
    a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> Interval:
    """mean(a) - mean(b), paired by seed and question, with its percentile interval (fast path).

    The difference of the two means on one draw is the mean of the paired differences `a - b` on that draw, so the
    replicates are those of `mean_interval(a - b)` (a constant shift b = a + c gives exactly [-c, -c]).

    Args:
        a, b: [shape: (n_seeds, n_questions, ...)], the same layout.
    """
    x, y = _check((a, b), n_boot, level)
    if x.shape != y.shape:
        raise ValueError(
            f"a has shape {x.shape} and b {y.shape}: a paired difference needs one shape (the same seeds, questions "
            "and samples per question)."
        )
    d = x - y
    return _interval(float(d.mean()), _mean_replicates(d, n_boot, seed), level, n_boot)


def macro_interval(
    values: np.ndarray, strata: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> Interval:
    """The mean of the strata's (data sets') means over seeds and questions, with its percentile interval: seeds,
    then questions within each stratum (fast path).

    Args:
        values: [shape: (n_seeds, n_questions, ...)].
        strata: each question's data set [shape: (n_questions,)].
    """
    (x,) = _check((values,), n_boot, level)
    estimate = float(
        (x.reshape(x.shape[0], x.shape[1], -1).mean(axis=(0, 2)) * macro_weights(strata, x.shape[1])).sum()
    )
    return _interval(estimate, _mean_replicates(x, n_boot, seed, strata), level, n_boot)


def paired_macro_difference(
    a: np.ndarray, b: np.ndarray, strata: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> Interval:
    """macro(a) - macro(b), paired by seed and question, questions resampled within their data set (fast path).

    Args:
        a, b: [shape: (n_seeds, n_questions, ...)], the same layout.
        strata: each question's data set [shape: (n_questions,)].
    """
    x, y = _check((a, b), n_boot, level)
    if x.shape != y.shape:
        raise ValueError(
            f"a has shape {x.shape} and b {y.shape}: a paired difference needs one shape (the same seeds, questions "
            "and samples per question)."
        )
    return macro_interval(x - y, strata, n_boot=n_boot, seed=seed, level=level)
