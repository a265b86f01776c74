"""The noise of a demo run's accuracies: the standard errors printed beside every accuracy, and whether a change
exceeds them.

* **Validation** is verl's mean@k exact match over n held-out questions with k episodes each, sampled at the rollout
  temperature. Its standard error is binomial over the n*k episodes, ``se = sqrt(p (1 - p) / (n k))``: how much the
  mean would move if the episodes were drawn again. It treats the episodes as independent; questions of unequal
  difficulty make the spread over *other* question sets larger than this.
* **Greedy** decoding is one deterministic episode per question: ``se = sqrt(p (1 - p) / n)``, the spread over other
  question sets of the same kind. Its change is paired (the same questions before and after):
  ``se = sd(after_i - before_i) / sqrt(n)``.
* A change smaller than twice its standard error is reported as "within noise".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence


def binomial_se(p: float, n: int) -> float:
    """Standard error of a mean of `n` independent 0/1 outcomes with mean `p`: sqrt(p (1 - p) / n)."""
    if n < 1 or not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_se needs n >= 1 and p in [0, 1], got p={p}, n={n}.")
    return math.sqrt(p * (1.0 - p) / n)


def paired_change(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean change and its standard error for outcomes of the same questions: (mean(d), sd(d) / sqrt(n))."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_change needs two equally long non-empty lists, got {len(before)} and {len(after)}.")
    diff = [a - b for a, b in zip(after, before, strict=True)]
    sd = statistics.stdev(diff) if len(diff) > 1 else 0.0
    return statistics.mean(diff), sd / math.sqrt(len(diff))


def change_text(delta: float, se: float, how: str) -> str:
    """`+1.3 ± 3.2 points (paired; within noise)`: a change in points with its se and whether it exceeds 2 se."""
    verdict = "within noise" if abs(delta) <= 2 * se else "more than 2 s.e."
    return f"{100 * delta:+.1f} ± {100 * se:.1f} points ({how}; {verdict})"


def validation_size(summary: Mapping) -> tuple[int, int]:
    """(n questions, k episodes per question) of a run's validation, from its summary (older ones: its config)."""
    n = summary.get("n_questions") or summary["config"]["n_test"]
    k = summary.get("episodes_per_question") or episodes_per_question(summary["accuracy_metric"])
    return int(n), int(k)


def curve_se(summary: Mapping) -> list[float]:
    """The binomial standard error of each validation point of a run (see the module docstring)."""
    n, k = validation_size(summary)
    return [binomial_se(p, n * k) for p in summary["curve"]["accuracy"]]


def episodes_per_question(key: str) -> int:
    """k of a `.../mean@k` metric name."""
    return int(key.rsplit("@", 1)[1])
