"""Action entropy (Eq. 8) and the running state entropy of Alg. 1.

The paper estimates a state's sequence-level entropy by Monte Carlo over the actions actually sampled from it:
each sampled action contributes its own length-normalised negative log-probability, and the state's estimate is
the running mean over those samples (Alg. 1, line 18). Until a state is forked it is a one-sample estimate.
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
    total = 0.0
    for lp in log_probs:
        if not math.isfinite(lp):
            raise ValueError(f"action_entropy got a non-finite log-prob ({lp}); check the inference engine output.")
        total += lp
    return -total / len(log_probs)


def compute_action_entropy(log_probs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Batched h(a) for actions laid out as rows (verl's layout).

    Math (Eq. 8):
        h_i = -sum_j m_ij * logp_ij / sum_j m_ij

    Args:
        log_probs: sampled-token log-probs [shape: (bs, response_length)].
        response_mask: 1 on the action's tokens, 0 on padding [shape: (bs, response_length)].

    Returns:
        Action entropy per row [shape: (bs,)]; NaN for a row with no action token.
    """
    mask = response_mask.to(log_probs.dtype)
    # Step 1: zero the masked positions first, so padding that holds NaN/-inf cannot leak into the sum.
    masked = torch.where(mask > 0, log_probs, torch.zeros_like(log_probs))
    # Step 2: length-normalise; 0/0 -> NaN marks rows without an action.
    return -masked.sum(-1) / mask.sum(-1)


def update_state_entropy(h_hat: float, n_hat: int, h_new: float) -> tuple[float, int]:
    """One running-mean update of a state's entropy when a new action is sampled from it.

    Math (Alg. 1, line 18):
        h_hat <- (h' + h_hat * n_hat) / (n_hat + 1);  n_hat <- n_hat + 1

    Returns:
        The updated (h_hat, n_hat).
    """
    if n_hat == 0:
        return h_new, 1
    return (h_new + h_hat * n_hat) / (n_hat + 1), n_hat + 1


def compute_state_entropy(
    parent: torch.Tensor, action_entropy: torch.Tensor, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_hat and n_hat of every state at once: the mean of its children's action entropies and their count.

    This is the closed form of the running mean of `update_state_entropy` (the order of updates does not matter).

    Args:
        parent: parent id of each node, -1 for roots [shape: (num_nodes,)].
        action_entropy: h of the action entering each node, ignored at roots [shape: (num_nodes,)].
        num_nodes: number of nodes.

    Returns:
        (h_hat, n_hat) [shapes: (num_nodes,), (num_nodes,)]; h_hat is NaN where n_hat == 0.
    """
    has_parent = parent >= 0
    src = parent[has_parent]
    n_hat = torch.zeros(num_nodes, dtype=torch.long).index_add_(0, src, torch.ones_like(src))
    h_sum = torch.zeros(num_nodes, dtype=action_entropy.dtype).index_add_(0, src, action_entropy[has_parent])
    return h_sum / n_hat, n_hat
