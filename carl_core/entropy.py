"""Action entropy (Eq. 8) and the state entropy of Alg. 1.

The paper estimates a state's sequence-level entropy by Monte Carlo over the actions actually sampled from it: each
sampled action contributes its own length-normalised negative log-probability, and the state's estimate is the
running mean over those samples (Alg. 1, line 18: h <- (h' + h * n) / (n + 1)). Until a state is forked it is a
one-sample estimate. The running mean does not depend on the order of its updates, so `compute_state_entropy`
computes it in closed form for every state at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def action_entropy(log_probs: Sequence[float]) -> float:
    """h(a) of one action from the log-probs of its sampled tokens.

    Math (Eq. 8, GNMT length normalisation):
        h(a) = -(1/|a|) * sum_j log pi(a_j | a_<j, s)

    Args:
        log_probs: log pi of each sampled token of the action [shape: (|a|,)].

    Returns:
        The action entropy in nats per token (>= 0).
    """
    if len(log_probs) == 0:
        raise ValueError("action_entropy of an empty action: an action needs at least one sampled token.")
    if not all(math.isfinite(lp) for lp in log_probs):
        raise ValueError(f"action_entropy got a non-finite log-prob in {list(log_probs)[:4]}; check the engine output.")
    return -sum(log_probs) / len(log_probs)


def compute_state_entropy(
    parent: torch.Tensor, action_entropy: torch.Tensor, count: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_hat and n_hat of every state: the mean entropy of the actions sampled from it, and their count.

    Math (Alg. 1, line 18, in closed form; an action sampled m_v times, merged into one child, counts m_v times):
        n_hat(s) = sum_{v in child(s)} m_v,   h_hat(s) = (1 / n_hat(s)) * sum_{v in child(s)} m_v * h(a_v)

    Args:
        parent: parent id of each node, -1 for roots [shape: (num_nodes,)].
        action_entropy: h of the action entering each node, ignored at roots [shape: (num_nodes,)].
        count: m, how often each node's entering action was sampled; None = once each [shape: (num_nodes,)].

    Returns:
        (h_hat, n_hat) [shapes: (num_nodes,), (num_nodes,)]; h_hat is NaN where n_hat == 0.
    """
    has_parent = parent >= 0
    src = parent[has_parent]
    m = torch.ones_like(src) if count is None else count[has_parent].to(torch.long)
    n_hat = torch.zeros(parent.numel(), dtype=torch.long).index_add_(0, src, m)
    weighted = action_entropy[has_parent] * m.to(action_entropy.dtype)
    h_sum = torch.zeros(parent.numel(), dtype=action_entropy.dtype).index_add_(0, src, weighted)
    return h_sum / n_hat, n_hat
