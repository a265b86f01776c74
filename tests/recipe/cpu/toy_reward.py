"""Toy dense reward for CPU smoke runs: the fraction of lowercase letters and spaces in the response.

A random tiny model scores about 0.1 with a spread across samples, so GRPO advantages are non-zero from step 1.
verl calls it through ``reward.custom_reward_function.path=<this file>``
(``reward.custom_reward_function.name=compute_score``).
"""

_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyz ")


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """Return the share of characters of ``solution_str`` in ``[a-z ]`` (0.0 for an empty response)."""
    if not solution_str:
        return 0.0
    return sum(ch in _ALLOWED for ch in solution_str) / len(solution_str)
